//! `sluice chat "question"`: streams one run to the terminal with the Rust client — reasoning
//! dimmed, then the answer — resuming by itself if the connection drops.

use std::io::Write;

use sluice_client::Client;
use sluice_protocol::EventBody;
use sluice_protocol::api::RunRequest;

#[derive(Debug, Clone, clap::Args)]
pub struct ChatArgs {
    /// The message to send.
    pub message: String,
    /// The server's base URL.
    #[arg(long, env = "SLUICE_URL", default_value = "http://127.0.0.1:7420")]
    pub url: String,
    /// API key, when the server requires one.
    #[arg(long, env = "SLUICE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Model to use (the server's default when absent).
    #[arg(long)]
    pub model: Option<String>,
    /// Continue this thread instead of starting a new one.
    #[arg(long)]
    pub thread: Option<String>,
    /// Dim the reasoning with terminal colours: auto (when stdout is a terminal), always, never.
    #[arg(long, default_value = "auto", value_parser = ["auto", "always", "never"])]
    pub color: String,
}

pub async fn run(args: ChatArgs) -> anyhow::Result<()> {
    let mut client = Client::new(args.url.clone());
    if let Some(k) = &args.api_key {
        client = client.with_key(k.clone());
    }
    let req = RunRequest {
        content: args.message.clone(),
        model: args.model.clone(),
        on_busy: Default::default(),
        on_disconnect: Default::default(),
        agent: None,
    };
    let mut stream = client.stream_run(args.thread.as_deref(), &req).await?;
    let mut out = std::io::stdout().lock();
    let color = match args.color.as_str() {
        "always" => true,
        "never" => false,
        _ => std::io::IsTerminal::is_terminal(&std::io::stdout()),
    };
    let (dim, reset) = if color {
        ("\x1b[2m", "\x1b[0m")
    } else {
        ("", "")
    };
    let mut in_reasoning = false;
    while let Some(ev) = stream.next().await {
        let ev = ev?;
        match ev.event.body {
            EventBody::RunStarted { thread_id, .. } => {
                writeln!(
                    out,
                    "{dim}thread {thread_id} · run {}{reset}",
                    ev.event.run_id
                )?;
            }
            EventBody::ReasoningDelta { delta } => {
                if !in_reasoning {
                    in_reasoning = true;
                    write!(out, "{dim}")?;
                }
                write!(out, "{delta}")?;
            }
            EventBody::ReasoningDone {} => {
                in_reasoning = false;
                write!(out, "{reset}\n\n")?;
            }
            EventBody::TextDelta { delta } => write!(out, "{delta}")?,
            EventBody::TextDone {} => writeln!(out)?,
            EventBody::Error { error } => {
                writeln!(out, "\nerror {}: {}", error.code.as_str(), error.message)?
            }
            EventBody::RunCompleted {
                usage,
                time_to_first_token_ms,
                ..
            } => writeln!(
                out,
                "{dim}done · {} in / {} out tokens · first token {:.0} ms{reset}",
                usage.input_tokens,
                usage.output_tokens,
                time_to_first_token_ms.unwrap_or(0.0)
            )?,
            EventBody::RunFailed { error } => anyhow::bail!("run failed: {}", error.message),
            EventBody::RunCancelled { reason } => {
                writeln!(out, "\n{dim}cancelled: {reason}{reset}")?
            }
            EventBody::RunInterrupted { reason, .. } => {
                writeln!(out, "\n{dim}interrupted: {reason}{reset}")?
            }
            _ => {}
        }
        out.flush()?;
    }
    Ok(())
}
