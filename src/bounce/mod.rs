//! TODO: bounce
