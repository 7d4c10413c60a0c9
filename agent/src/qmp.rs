//! QMP client: being written.
