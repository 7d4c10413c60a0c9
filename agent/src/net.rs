//! Taps and bridges: being written.
