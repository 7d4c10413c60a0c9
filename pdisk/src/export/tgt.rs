//! tgt exporter: placeholder, being written.
