//! stratus-pki: the CA of a Stratus cloud and the certificates of its
//! daemons, front-ends, admins and projects. No openssl CLI needed.
//!
//! ```text
//! stratus-pki init  --dir /etc/stratus/pki
//! stratus-pki issue --dir /etc/stratus/pki --role server --name storage-1 --host storage-1.example.org
//! stratus-pki issue --dir /etc/stratus/pki --role agent --name compute-7 \
//!     --iqn iqn.2026-11.org.example:compute-7 --host compute-7.example.org
//! stratus-pki issue --dir /etc/stratus/pki --role admin --name alice
//! stratus-pki show /etc/stratus/pki/agent-compute-7.pem
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use stratus_pki::identity::{Identity, Role};
use stratus_pki::issue::{self, Request};

#[derive(Parser)]
#[command(name = "stratus-pki", version, about = "Stratus CA and certificates")]
struct Cli {
    /// Print results as JSON
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make a new CA in DIR (ca.pem, and ca.key mode 0600); never replaces one
    Init {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The CA's common name
        #[arg(long, default_value = "Stratus CA")]
        name: String,
        /// Validity in days
        #[arg(long, default_value_t = issue::CA_DAYS)]
        days: u32,
    },
    /// Issue a key and a certificate signed by DIR's CA, naming
    /// stratus://ROLE/NAME (and stratus://iqn/IQN with --iqn)
    Issue {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// admin, frontend, agent, project, or server (a daemon's own)
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// The holder's name; for --role project, the project
        #[arg(long)]
        name: String,
        /// agent only: the initiator IQN pdiskd will export to for it
        #[arg(long, value_name = "IQN")]
        iqn: Option<String>,
        /// A DNS name or IP address the holder serves on (repeatable; makes
        /// the certificate usable by a server)
        #[arg(long = "host", value_name = "HOST")]
        hosts: Vec<String>,
        /// Validity in days
        #[arg(long, default_value_t = issue::LEAF_DAYS)]
        days: u32,
        /// Output path without extension: writes OUT.pem and OUT.key (0600)
        /// [default: DIR/ROLE-NAME]
        #[arg(long, value_name = "OUT")]
        out: Option<PathBuf>,
        /// Replace existing files (certificate rotation)
        #[arg(long)]
        force: bool,
    },
    /// Show a certificate's identity, hosts and validity
    Show { cert: PathBuf },
}

fn parse_role(s: &str) -> Result<Role, String> {
    Role::parse(s)
        .ok_or_else(|| format!("unknown role {s:?} (admin, frontend, agent, project, server)"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({"error": {"message": format!("{e:#}")}})
                );
            }
            eprintln!("stratus-pki: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Init { dir, name, days } => {
            issue::init_dir(dir, name, *days)?;
            let cert = issue::ca_cert_path(dir);
            if cli.json {
                println!(
                    "{:#}",
                    serde_json::json!({"ca_cert": cert, "ca_key": issue::ca_key_path(dir)})
                );
            } else {
                println!(
                    "CA made: {} (key {}, mode 0600)",
                    cert.display(),
                    issue::ca_key_path(dir).display()
                );
            }
        }
        Command::Issue {
            dir,
            role,
            name,
            iqn,
            hosts,
            days,
            out,
            force,
        } => {
            let ca = issue::load_ca(dir)?;
            let identity = Identity {
                role: *role,
                name: name.clone(),
                iqn: iqn.clone(),
            };
            let issued = issue::issue(&ca, &Request::new(identity.clone(), hosts.clone(), *days))?;
            let base = out
                .clone()
                .unwrap_or_else(|| dir.join(format!("{role}-{name}")));
            let cert_path = base.with_extension("pem");
            let key_path = base.with_extension("key");
            if !force && (cert_path.exists() || key_path.exists()) {
                anyhow::bail!(
                    "{} or {} exists (--force replaces them)",
                    cert_path.display(),
                    key_path.display()
                );
            }
            // The key first: a certificate is never on disk without its key.
            issue::write_new(&key_path, &issued.key_pem, 0o600, true).context("writing the key")?;
            issue::write_new(&cert_path, &issued.cert_pem, 0o644, true)
                .context("writing the certificate")?;
            if cli.json {
                println!(
                    "{:#}",
                    serde_json::json!({
                        "cert": cert_path, "key": key_path,
                        "identity": identity, "uris": identity.san_uris(), "hosts": hosts,
                    })
                );
            } else {
                println!(
                    "{} ({}), key {}",
                    cert_path.display(),
                    identity.san_uris().join(" "),
                    key_path.display()
                );
            }
        }
        Command::Show { cert } => {
            let text = std::fs::read_to_string(cert)
                .with_context(|| format!("reading {}", cert.display()))?;
            let facts = issue::describe(&text)?;
            if cli.json {
                println!("{:#}", serde_json::to_value(&facts)?);
            } else {
                let who = match (&facts.identity, &facts.identity_error) {
                    (Some(i), _) => i.to_string(),
                    (None, Some(e)) if facts.is_ca => format!("a CA ({e})"),
                    (None, Some(e)) => format!("no identity: {e}"),
                    (None, None) => "-".into(),
                };
                println!("identity:   {who}");
                println!("subject:    {}", facts.subject);
                println!("issuer:     {}", facts.issuer);
                if !facts.hosts.is_empty() {
                    println!("hosts:      {}", facts.hosts.join(", "));
                }
                println!("valid from: {}", facts.not_before);
                println!("valid to:   {}", facts.not_after);
            }
        }
    }
    Ok(())
}
