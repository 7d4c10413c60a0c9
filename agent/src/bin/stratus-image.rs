//! `stratus-image`: the endorser's tool. Makes an Ed25519 key, signs an
//! image manifest with it (the token a front-end passes with the image,
//! `agentctl ... --endorsement`), and verifies a token as a host would.
//! The format is in `agent::images::endorsement`.
//!
//! ```text
//! stratus-image keygen --out endorser.key          # prints the public key
//! stratus-image sign --key endorser.key --url URL --sha256 HEX \
//!     --format qcow2 --endorser ops@example.org --valid-for 90d > image.endorsement
//! stratus-image verify --trust ed25519:... --token-file image.endorsement
//! ```
//!
//! Same conventions as `pdisk` and `agentctl`: `--json`, one stderr line
//! per failure, exit status 1 (refused) or 2 (bad input).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use agent::images::endorsement::{rfc3339, Manifest};
use agent::images::{DeclaredFormat, Endorsement, ImageRef, PublicKey, SigningKey};
use clap::{Parser, Subcommand};
use serde_json::json;
use stratus_core::cli::{self, Failure};

const PROGRAM: &str = "stratus-image";

#[derive(Parser)]
#[command(name = PROGRAM, version, about = "Sign and verify Stratus image endorsements")]
struct Cli {
    /// Print results (and errors) as JSON on stdout.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make a new Ed25519 key (PKCS#8 PEM, mode 0600; refuses to overwrite).
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the public key of a private key file (for allow_endorser_keys).
    Pubkey {
        #[arg(long)]
        key: PathBuf,
    },
    /// Sign an image manifest; prints the endorsement token.
    Sign {
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        url: String,
        #[arg(long)]
        sha256: String,
        /// raw, qcow2 or auto: the format hosts will run it as.
        #[arg(long, default_value = "auto")]
        format: DeclaredFormat,
        /// Who vouches: an e-mail address or a DN.
        #[arg(long)]
        endorser: String,
        /// How long the endorsement is valid (e.g. 90d, 12h).
        #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
        valid_for: Duration,
    },
    /// Verify a token against trusted public keys, as a host's policy does.
    Verify {
        /// A trusted key, ed25519:<base64> (repeatable).
        #[arg(long = "trust", required = true)]
        trust: Vec<String>,
        /// The token; or --token-file.
        #[arg(conflicts_with = "token_file", required_unless_present = "token_file")]
        token: Option<String>,
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => cli::usage_exit(err),
    };
    match run(cli.command, cli.json) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => cli::report(PROGRAM, &f, cli.json),
    }
}

fn usage(e: stratus_core::error::Error) -> Failure {
    Failure::Usage(e.to_string())
}

fn run(command: Command, json: bool) -> Result<(), Failure> {
    match command {
        Command::Keygen { out } => {
            let (pem, key) = SigningKey::generate().map_err(|e| Failure::Local(e.to_string()))?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&out)
                .map_err(|e| Failure::Local(format!("{}: {e}", out.display())))?;
            f.write_all(pem.as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(|e| Failure::Local(format!("{}: {e}", out.display())))?;
            let public = key.public().to_string();
            cli::print(json, json!({"key_file": out, "public_key": public}), || {
                format!("{public}\n")
            })
        }
        Command::Pubkey { key } => {
            let public = SigningKey::load(&key).map_err(usage)?.public().to_string();
            cli::print(json, json!({"public_key": public}), || {
                format!("{public}\n")
            })
        }
        Command::Sign {
            key,
            url,
            sha256,
            format,
            endorser,
            valid_for,
        } => {
            // Checked as a host will check them, so a token is never made
            // for a reference no host accepts.
            let image =
                ImageRef::new(&url, &sha256, format, Some(endorser.clone())).map_err(usage)?;
            let key = SigningKey::load(&key).map_err(usage)?;
            let now = SystemTime::now();
            let manifest = Manifest {
                url: image.url().to_owned(),
                sha256: image.sha256().as_str().to_owned(),
                format: image.format().to_string(),
                endorser,
                issued: rfc3339(now),
                expires: rfc3339(now + valid_for),
                signer: String::new(),
            };
            let token = key.sign(manifest.clone());
            let signed = Endorsement::parse(&token).map_err(usage)?;
            cli::print(
                json,
                json!({"token": token, "manifest": signed.claimed()}),
                || format!("{token}\n"),
            )
        }
        Command::Verify {
            trust,
            token,
            token_file,
        } => {
            let trusted = trust
                .iter()
                .map(|k| PublicKey::parse(k))
                .collect::<Result<Vec<_>, _>>()
                .map_err(usage)?;
            let token = match (token, token_file) {
                (Some(t), _) => t,
                (None, Some(f)) => std::fs::read_to_string(&f)
                    .map_err(|e| Failure::Local(format!("{}: {e}", f.display())))?,
                (None, None) => unreachable!("clap requires one"),
            };
            let e = Endorsement::parse(&token).map_err(usage)?;
            let m = e
                .verify(&trusted, SystemTime::now())
                .map_err(|why| Failure::Local(format!("endorsement refused: {why}")))?;
            cli::print(json, json!({"valid": true, "manifest": m}), || {
                format!(
                    "valid: {} endorses {} (sha256 {}, {}) until {}, signed by {}\n",
                    m.endorser, m.url, m.sha256, m.format, m.expires, m.signer
                )
            })
        }
    }
}
