//! Parser tests on small hand-written bounces, one per format family.
