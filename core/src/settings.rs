//! Daemon settings and logging, the same for pdiskd and agentd: a TOML file
//! under the flags (unknown keys refused by each daemon's `Flags`), and
//! tracing on stderr as human lines or JSON.

use std::path::Path;

use clap::ValueEnum;
use serde::Deserialize;

use crate::error::{Error, Result};

/// How a daemon writes its log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// Reads a daemon's TOML settings file, or the defaults when there is none.
/// Shared by pdiskd and agentd so both treat files the same way.
pub fn load_toml<T: serde::de::DeserializeOwned + Default>(path: Option<&Path>) -> Result<T> {
    let Some(p) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(p)
        .map_err(|e| Error::invalid(format!("config {}: {e}", p.display())))?;
    toml::from_str(&text).map_err(|e| Error::invalid(format!("config {}: {e}", p.display())))
}

/// Sets up tracing on stderr for a daemon: human (colours only on a
/// terminal) or JSON lines, filtered by `level` (an EnvFilter directive).
pub fn init_logging(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
