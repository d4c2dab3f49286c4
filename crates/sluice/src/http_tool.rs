//! Tools that live outside the server, behind HTTP: `[tools.NAME]` in sluice.toml.
//!
//! Sluice POSTs the call's arguments (JSON) to the tool's URL. The endpoint answers plain JSON (the
//! result), or streams NDJSON: lines `{"progress": {"step", "fraction"?, "message"?}}` become
//! `tool_execution_progress` as they arrive, and a final `{"result": …}` (or `{"error": "…"}`) ends
//! the call. A non-2xx status, a timeout or a malformed line fails the call with a message the
//! model can read. Cancelling the run drops the request.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use sluice_engine::tools::ToolFuture;
use sluice_engine::{Tool, ToolContext};
use sluice_providers::ToolSpec;

pub struct HttpTool {
    spec: ToolSpec,
    url: String,
    timeout: Duration,
    client: reqwest::Client,
}

impl HttpTool {
    pub fn new(spec: ToolSpec, url: String, timeout: Duration) -> Self {
        HttpTool {
            spec,
            url,
            timeout,
            client: reqwest::Client::builder()
                .tcp_nodelay(true)
                .build()
                .unwrap_or_default(),
        }
    }
}

impl Tool for HttpTool {
    fn spec(&self) -> ToolSpec {
        self.spec.clone()
    }

    fn call(&self, arguments: Value, ctx: ToolContext) -> ToolFuture {
        let (client, url, timeout, name) = (
            self.client.clone(),
            self.url.clone(),
            self.timeout,
            self.spec.name.clone(),
        );
        Box::pin(async move {
            let work = async {
                let resp = client
                    .post(&url)
                    .json(&arguments)
                    .send()
                    .await
                    .map_err(|e| format!("the {name} tool could not be reached: {e}"))?;
                let status = resp.status();
                if !status.is_success() {
                    let body: String = resp
                        .text()
                        .await
                        .unwrap_or_default()
                        .chars()
                        .take(300)
                        .collect();
                    return Err(format!(
                        "the {name} tool answered HTTP {}: {body}",
                        status.as_u16()
                    ));
                }
                let ndjson = resp
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|t| t.contains("ndjson"));
                if !ndjson {
                    return resp
                        .json::<Value>()
                        .await
                        .map_err(|e| format!("the {name} tool's answer is not JSON: {e}"));
                }
                let mut body = resp.bytes_stream();
                let mut line = Vec::new();
                while let Some(chunk) = body.next().await {
                    let chunk =
                        chunk.map_err(|e| format!("the {name} tool's stream broke: {e}"))?;
                    for b in chunk {
                        if b != b'\n' {
                            line.push(b);
                            continue;
                        }
                        let text = std::mem::take(&mut line);
                        if text.iter().all(u8::is_ascii_whitespace) {
                            continue;
                        }
                        let v: Value = serde_json::from_slice(&text)
                            .map_err(|e| format!("the {name} tool sent a malformed line: {e}"))?;
                        if let Some(p) = v.get("progress") {
                            let step = p["step"].as_str().unwrap_or("working").to_string();
                            ctx.progress(
                                step,
                                p["fraction"].as_f64(),
                                p["message"].as_str().map(str::to_string),
                            )
                            .await;
                        } else if let Some(result) = v.get("result") {
                            return Ok(result.clone());
                        } else if let Some(err) = v.get("error") {
                            return Err(err
                                .as_str()
                                .map(str::to_string)
                                .unwrap_or_else(|| err.to_string()));
                        }
                    }
                }
                Err(format!("the {name} tool's stream ended without a result"))
            };
            match tokio::time::timeout(timeout, work).await {
                Ok(res) => res,
                Err(_) => Err(format!(
                    "the {name} tool did not finish within {} ms",
                    timeout.as_millis()
                )),
            }
        })
    }
}
