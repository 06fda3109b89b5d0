//! The `ws-gateway` binary: flags → Config, logging, bind, run.

use anyhow::Context;
use clap::Parser;
use ws_gateway::{Exit, Settings};

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
            let _ = e.print();
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
        ws_gateway::run(config, listener, admin)
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
