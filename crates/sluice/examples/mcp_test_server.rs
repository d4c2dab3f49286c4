//! The tests' small MCP server (`tests/it/mcp_server.rs`) served over stdio.

#[path = "../tests/it/mcp_server.rs"]
mod mcp_server;

use rmcp::ServiceExt;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let service = mcp_server::CountServer::new()
        .serve(rmcp::transport::io::stdio())
        .await?;
    service.waiting().await?;
    Ok(())
}
