// End-to-end harness: the real `sluice serve` (embedded store in a temp dir, demo model), a TCP
// proxy in front of it that can cut the page's event streams the way a dropped connection does,
// and Debian's Chromium driven by playwright-core.
import { spawn } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, "../../..");
export const screenshots = join(here, "screenshots");

function sluiceBinary() {
  if (process.env.SLUICE_BIN) return process.env.SLUICE_BIN;
  const target = process.env.CARGO_TARGET_DIR ? resolve(process.env.CARGO_TARGET_DIR) : join(repo, "target");
  return join(target, "debug", "sluice");
}

export function chromiumPath() {
  for (const p of [process.env.CHROMIUM_PATH, "/usr/bin/chromium", "/usr/bin/chromium-browser"]) {
    if (p && existsSync(p)) return p;
  }
  throw new Error("Chromium not found: install Debian's package (apt-get install chromium) or set CHROMIUM_PATH");
}

function freePort() {
  return new Promise((ok, fail) => {
    const s = net.createServer();
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => ok(port));
    });
    s.on("error", fail);
  });
}

async function waitReady(url, child, log) {
  const deadline = Date.now() + 30_000;
  while (Date.now() < deadline) {
    if (child.exitCode !== null) throw new Error(`sluice exited (${child.exitCode}):\n${log()}`);
    try {
      const r = await fetch(url);
      if (r.ok) return;
    } catch {
      // not listening yet
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`sluice did not become ready at ${url}:\n${log()}`);
}

/** Starts sluice; returns {url, stop()}. */
export async function startSluice({ tokensPerSec = 40, apiKeys = "" } = {}) {
  const bin = sluiceBinary();
  if (!existsSync(bin)) throw new Error(`no sluice binary at ${bin}: run cargo build -p sluice (or set SLUICE_BIN)`);
  const dataDir = mkdtempSync(join(tmpdir(), "sluice-e2e-"));
  const port = await freePort();
  let output = "";
  const child = spawn(
    bin,
    ["serve", "--listen", `127.0.0.1:${port}`, "--data-dir", dataDir, "--demo-tokens-per-sec", String(tokensPerSec)],
    { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, SLUICE_API_KEYS: apiKeys, RUST_LOG: "warn" } },
  );
  // If this process dies without running its after() hooks, the server must not outlive it.
  const reap = () => child.exitCode === null && child.kill("SIGKILL");
  process.once("exit", reap);
  child.stdout.on("data", (d) => (output += d));
  child.stderr.on("data", (d) => (output += d));
  const url = `http://127.0.0.1:${port}`;
  await waitReady(`${url}/readyz`, child, () => output);
  return {
    url,
    log: () => output,
    async stop() {
      process.removeListener("exit", reap);
      if (child.exitCode === null) {
        child.kill("SIGTERM");
        await new Promise((r) => child.once("exit", r));
      }
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

/**
 * A byte-for-byte TCP proxy. `cutStreams()` closes every connection that is carrying an event
 * stream, as a load balancer or a flaky network would; `requests` lists the request heads seen.
 */
export async function startProxy(targetUrl) {
  const target = new URL(targetUrl);
  const pairs = new Set();
  const requests = [];
  const server = net.createServer((client) => {
    const upstream = net.connect(Number(target.port), target.hostname);
    const pair = { client, upstream, streaming: false };
    pairs.add(pair);
    let head = "";
    client.on("data", (d) => {
      head += d.toString("latin1");
      let end;
      while ((end = head.indexOf("\r\n\r\n")) !== -1) {
        const block = head.slice(0, end);
        head = head.slice(end + 4);
        const m = /^([A-Z]+) (\S+) HTTP/.exec(block);
        if (!m) continue;
        const headers = {};
        for (const line of block.split("\r\n").slice(1)) {
          const i = line.indexOf(":");
          if (i > 0) headers[line.slice(0, i).trim().toLowerCase()] = line.slice(i + 1).trim();
        }
        requests.push({ method: m[1], path: m[2], headers });
      }
      if (head.length > 65536) head = ""; // a request body, not a head
    });
    upstream.on("data", (d) => {
      if (d.includes("text/event-stream")) pair.streaming = true;
    });
    client.pipe(upstream);
    upstream.pipe(client);
    const close = () => {
      pairs.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    client.on("error", close);
    upstream.on("error", close);
    client.on("close", close);
    upstream.on("close", close);
  });
  await new Promise((ok) => server.listen(0, "127.0.0.1", ok));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    requests,
    /** Cuts the connections carrying event streams; returns how many. */
    cutStreams() {
      let n = 0;
      for (const p of [...pairs]) {
        if (!p.streaming) continue;
        n++;
        p.client.destroy();
        p.upstream.destroy();
        pairs.delete(p);
      }
      return n;
    },
    close() {
      for (const p of pairs) {
        p.client.destroy();
        p.upstream.destroy();
      }
      return new Promise((ok) => server.close(ok));
    },
  };
}

export async function launchBrowser() {
  const userDataDir = mkdtempSync(join(tmpdir(), "sluice-chromium-"));
  // A persistent context is how playwright takes a fresh --user-data-dir of our own.
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: chromiumPath(),
    headless: true,
    viewport: { width: 1400, height: 900 },
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  return {
    context,
    async close() {
      await context.close();
      rmSync(userDataDir, { recursive: true, force: true });
    },
  };
}

export function shot(page, name) {
  mkdirSync(screenshots, { recursive: true });
  return page.screenshot({ path: join(screenshots, `${name}.png`), fullPage: false });
}
