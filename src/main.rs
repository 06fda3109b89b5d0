//! The `ws-gateway` binary: flags → Config, logging, bind, run.

use anyhow::Context;
use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{CommandFactory, Parser};
use std::error::Error as _;

use ws_gateway::{Exit, Settings, Trigger};

fn main() -> anyhow::Result<()> {
    let settings = match Settings::try_parse() {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) =>
        {
            e.exit()
        }
        Err(e) => {
            match named_error(&e) {
                Some(line) => eprintln!("ws-gateway: invalid configuration: {line}"),
                None => {
                    let _ = e.print();
                }
            }
            std::process::exit(1);
        }
    };
    let check_only = settings.check_config;
    let config = match settings.with_file().and_then(Settings::resolve) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ws-gateway: invalid configuration: {e}");
            std::process::exit(1);
        }
    };
    if check_only {
        println!("ws-gateway: configuration OK ({config})");
        return Ok(());
    }
    ws_gateway::logging::init(config.log_format);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let exit = runtime.block_on(async {
        let listener = ws_gateway::net::bind_listener(config.listen, config.reuse_port)
            .with_context(|| format!("binding {}", config.listen))?;
        let admin = ws_gateway::net::bind_listener(config.admin_listen, config.reuse_port)
            .with_context(|| format!("binding the admin listener {}", config.admin_listen))?;
        let triggers = signals().context("installing signal handlers")?;
        ws_gateway::run(config, listener, admin, triggers)
            .await
            .context("running the gateway")
    });
    match exit {
        // A forced exit (second signal) and a drain that ran out of time both end the process normally: the
        // operator asked for it, and the log line `stopped` says which it was.
        Ok(Exit::Drained | Exit::DeadlinePassed | Exit::Forced) => std::process::exit(0),
        Err(e) => {
            eprintln!("ws-gateway: {e:#}");
            std::process::exit(1);
        }
    }
}

/// SIGTERM and SIGINT ask for a shutdown (a second one forces it), SIGHUP for a certificate reload.
fn signals() -> std::io::Result<tokio::sync::mpsc::Receiver<Trigger>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let trigger = tokio::select! {
                _ = term.recv() => Trigger::Shutdown,
                _ = int.recv() => Trigger::Shutdown,
                _ = hup.recv() => Trigger::Reload,
            };
            if tx.send(trigger).await.is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

/// A bad value for a setting, in the gateway's own form: `ENV (--flag): the value "…" is not valid (why)`, saying
/// whether it came from the environment or the command line. `None` for other clap errors (unknown flags, usage).
fn named_error(e: &clap::Error) -> Option<String> {
    if !matches!(
        e.kind(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation
    ) {
        return None;
    }
    let ContextValue::String(arg) = e.get(ContextKind::InvalidArg)? else {
        return None;
    };
    let flag = arg
        .split_whitespace()
        .next()?
        .trim_start_matches('-')
        .to_owned();
    let command = Settings::command();
    let spec = command
        .get_arguments()
        .find(|a| a.get_long() == Some(flag.as_str()))?;
    let env = spec.get_env()?.to_string_lossy().into_owned();
    let value = match e.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(v)) => v.clone(),
        _ => String::new(),
    };
    let on_command_line =
        std::env::args().any(|a| a == format!("--{flag}") || a.starts_with(&format!("--{flag}=")));
    let from = if on_command_line {
        format!("--{flag}")
    } else {
        format!("the environment variable {env}")
    };
    let why = e.source().map(|s| format!(" ({s})")).unwrap_or_default();
    Some(format!(
        "{env} (--{flag}): the value \"{value}\" from {from} is not valid{why}"
    ))
}
