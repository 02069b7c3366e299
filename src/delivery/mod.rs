//! TODO: delivery
