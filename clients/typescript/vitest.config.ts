import { defineConfig } from "vitest/config";

// Unit tests only; e2e/ runs under node's test runner with a real browser (npm run e2e).
export default defineConfig({ test: { include: ["test/**/*.test.ts"] } });
