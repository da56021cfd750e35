//! The `dormant` binary: parses the command line and runs one command.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use dormant::cli::{Cli, Command, Output, PolicyCommand, remote, targets};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn wait(v: Option<String>) -> anyhow::Result<Option<Duration>> {
    v.map(|d| dormant::policy::duration::parse(&d).map_err(|e| anyhow::anyhow!("--wait: {e}"))).transpose()
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout();
    match cli.command {
        Command::Agent(args) => {
            dormant::agent::init_logging(args.log_format);
            dormant::agent::run(*args).await?;
        }
        Command::Status { output, conn } if conn.direct => {
            let client = remote::host_client(&conn).await?;
            print!("{}", targets::status(&client, output == Output::Json).await?);
        }
        Command::Status { output, conn } => {
            print!("{}", remote::status(&conn, output == Output::Json).await?)
        }
        Command::Explain { target, conn } if conn.direct => {
            let client = remote::host_client(&conn).await?;
            print!("{}", targets::explain(&client, &target).await?);
        }
        Command::Explain { target, conn } => print!("{}", remote::explain(&conn, &target).await?),
        Command::Sleep { target, prevent_wakeup, wait: w, conn } => {
            let w = wait(w)?;
            if conn.direct {
                let client = remote::host_client(&conn).await?;
                targets::sleep(&client, &target, prevent_wakeup.as_deref(), w, &mut out).await?;
            } else {
                remote::sleep(&conn, &target, prevent_wakeup.as_deref(), w, &mut out).await?;
            }
        }
        Command::Wake { target, wait: w, conn } => {
            let w = wait(w)?;
            if conn.direct {
                let client = remote::host_client(&conn).await?;
                targets::wake(&client, &target, w, &mut out).await?;
            } else {
                remote::wake(&conn, &target, w, &mut out).await?;
            }
        }
        Command::Ui { no_open, conn } => remote::ui(&conn, !no_open, &mut out).await?,
        Command::Restore {
            all: _,
            target,
            stop_agent,
            lease_name,
            only_namespaces,
            namespace_selector,
            exclude_namespaces,
        } => {
            let scope = dormant::target::Scope::from_flags(
                &only_namespaces,
                namespace_selector.as_deref(),
                &exclude_namespaces,
            )
            .map_err(|e| anyhow::anyhow!(e))?;
            let client = dormant::client::client().await?;
            if let Some(deployment) = &stop_agent {
                let timeout = std::time::Duration::from_secs(120);
                dormant::cli::restore::stop_agent(&client, deployment, &lease_name, timeout).await?;
                println!("agent {deployment} stopped");
            }
            let mut text = String::new();
            let done = dormant::cli::restore::restore(&client, target.as_ref(), &scope, &mut text).await?;
            print!("{text}");
            if done.failed > 0 || done.lost > 0 {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Kubeconfig { target, server, proxy_ca, output } => {
            let ca = std::fs::read_to_string(&proxy_ca)
                .map_err(|e| anyhow::anyhow!("--proxy-ca {}: {e}", proxy_ca.display()))?;
            let client = dormant::client::client().await?;
            let text = dormant::cli::kubeconfig::kubeconfig(&client, &target, &server, &ca).await?;
            match output {
                Some(path) => {
                    write_private(&path, &text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                    eprintln!("wrote {}", path.display());
                }
                None => print!("{text}"),
            }
        }
        Command::Simulate(args) => {
            let (text, skipped) = dormant::cli::simulate::run(&args).await?;
            print!("{text}");
            for s in skipped {
                eprintln!("skipped {}: {}", s.target, s.reason);
            }
        }
        Command::Migrate(args) => {
            let client = dormant::client::client().await?;
            let mut text = String::new();
            let done = dormant::cli::migrate::migrate(&client, &args, &mut text).await?;
            print!("{text}");
            if done.invalid > 0 || done.failed > 0 {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Policy(PolicyCommand::Lint { files }) => {
            let ok = dormant::cli::lint::run(&files, &mut out, &mut std::io::stderr())?;
            return Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE });
        }
        Command::Crd => print!("{}", dormant::cli::crd_yaml()?),
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes `text` readable by its owner only, as kubectl writes a
/// kubeconfig: it holds the vcluster's client key. A file that was there
/// keeps its inode but not its wider mode.
fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(text.as_bytes())
}
