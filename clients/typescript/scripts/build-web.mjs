// Builds the web page into crates/sluice-server/web/ (embedded in the binary by include_bytes!).
//   node scripts/build-web.mjs          write the bundle
//   node scripts/build-web.mjs --check  build elsewhere and fail if the committed bundle differs
// The output is deterministic (no hashes, no timestamps), so the check is a byte comparison.
import { build } from "esbuild";
import { mkdtempSync, readFileSync, writeFileSync, mkdirSync, copyFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { gzipSync } from "node:zlib";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, "..");
const target = join(root, "../../crates/sluice-server/web");
const check = process.argv.includes("--check");
const out = check ? mkdtempSync(join(tmpdir(), "sluice-web-")) : target;
const files = ["index.html", "app.js", "app.js.gz", "app.css"];

mkdirSync(out, { recursive: true });
await build({
  entryPoints: [join(root, "web/main.ts")],
  outfile: join(out, "app.js"),
  bundle: true,
  format: "esm",
  target: ["es2022"],
  minify: true,
  legalComments: "eof",
  charset: "utf8",
  logLevel: "warning",
});
// Served to browsers that accept gzip (all of them): about a third of the bytes. Node's gzip header has
// no timestamp, so the file is the same on every build.
writeFileSync(join(out, "app.js.gz"), gzipSync(readFileSync(join(out, "app.js")), { level: 9 }));
copyFileSync(join(root, "web/index.html"), join(out, "index.html"));
copyFileSync(join(root, "web/app.css"), join(out, "app.css"));

if (check) {
  const stale = files.filter((f) => {
    try {
      return !readFileSync(join(out, f)).equals(readFileSync(join(target, f)));
    } catch {
      return true;
    }
  });
  rmSync(out, { recursive: true, force: true });
  if (stale.length) {
    console.error(`the embedded web bundle is stale (${stale.join(", ")} differ from clients/typescript/web):`);
    console.error("run `npm run build:web` in clients/typescript and commit crates/sluice-server/web/");
    process.exit(1);
  }
  console.log("embedded web bundle matches its sources");
} else {
  const size = files.map((f) => `${f} ${(readFileSync(join(out, f)).length / 1024).toFixed(1)} KiB`).join(", ");
  console.log(`wrote ${out}: ${size}`);
}
