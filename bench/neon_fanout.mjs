// Serverless invocations with the real @neondatabase/serverless driver, for bench.run's
// `httpfanout` scenario: node --experimental-websocket neon_fanout.mjs '<JSON params>'
//
// params: {driver: path of the driver's package directory (tests/node/node_modules/...),
//   mode: "http" (neon() POST /sql at `endpoint`) or "ws" (Client over a WebSocket to `ws`,
//   host:port), connection_string, pipeline ("password" or "false", ws only), n, start_at
//   (wall-clock seconds: every process bursts at that instant), timeout_s}
// Each of the n invocations starts at start_at: http runs one neon() query `SELECT 1`; ws
// connects a Client, runs `SELECT 1` and ends it. Prints one JSON line in bench.loadgen's
// fanout shape: {n, ok, errors: {message: count}, latencies (s, sorted), wall_s, start_lag_s}.
// Bounded: n invocations, each given up after timeout_s; the process exits when all are done.
import { pathToFileURL } from 'node:url';

const ERROR_TEXT_LIMIT = 120; // as bench.loadgen's describe_error
const MAX_LATENCIES = 50_000; // as bench.loadgen's thin

const params = JSON.parse(process.argv[2]);
const { neon, Client, neonConfig } = await import(pathToFileURL(`${params.driver}/index.mjs`).href);

if (params.mode === 'http') {
  neonConfig.fetchEndpoint = params.endpoint;
} else {
  neonConfig.wsProxy = () => `${params.ws}/v2`;
  neonConfig.useSecureWebSocket = false;
  neonConfig.pipelineConnect = params.pipeline === 'false' ? false : params.pipeline;
}

function describe(error) {
  if (error === 'timeout') return 'timeout';
  const name = error?.name ?? typeof error;
  const text = String(error?.message ?? error).trim().split('\n')[0];
  return (text ? `${name}: ${text}` : name).slice(0, ERROR_TEXT_LIMIT);
}

async function httpInvocation() {
  const sql = neon(params.connection_string);
  await sql`SELECT 1`;
}

async function wsInvocation() {
  const client = new Client(params.connection_string);
  client.on('error', () => {}); // a lost connection is reported by the awaited call below
  try {
    await client.connect();
    await client.query('SELECT 1');
  } finally {
    await client.end().catch(() => {});
  }
}

const invoke = params.mode === 'http' ? httpInvocation : wsInvocation;
const delayMs = params.start_at * 1000 - Date.now();
if (delayMs > 0) await new Promise((resolve) => setTimeout(resolve, delayMs));
const started = performance.now();

async function invocation() {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject('timeout'), params.timeout_s * 1000);
  });
  try {
    await Promise.race([invoke(), timeout]);
    return [(performance.now() - started) / 1000, null];
  } catch (error) {
    return [(performance.now() - started) / 1000, describe(error)];
  } finally {
    clearTimeout(timer);
  }
}

const outcomes = await Promise.all(Array.from({ length: params.n }, invocation));
const latencies = outcomes.filter(([, error]) => error === null).map(([latency]) => latency);
latencies.sort((a, b) => a - b);
const errors = {};
for (const [, error] of outcomes) {
  if (error !== null) errors[error] = (errors[error] ?? 0) + 1;
}
const step = Math.max(1, latencies.length / MAX_LATENCIES);
const thinned = latencies.length <= MAX_LATENCIES ? latencies
  : Array.from({ length: MAX_LATENCIES }, (_, i) => latencies[Math.floor(i * step)]);
console.log(JSON.stringify({
  n: params.n,
  ok: latencies.length,
  errors,
  latencies: thinned,
  wall_s: Math.max(0, ...outcomes.map(([latency]) => latency)),
  start_lag_s: Math.max(0, -delayMs / 1000),
}));
process.exit(0); // a timed-out invocation may still hold a socket
