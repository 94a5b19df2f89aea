// Runs the driver's Pool/Client over a WebSocket to pypooler:
//   node --experimental-websocket neon_ws.mjs <ws host:port> <connection string> <pipelineConnect> <case>
// <pipelineConnect>: "password" (the driver's default: startup and password without waiting) or "false".
// Prints one JSON line: {"ok": result} or {"error": {message, code, ...}}.
import { Pool, Client, neonConfig } from '@neondatabase/serverless';

const [hostPort, connectionString, pipeline, which] = process.argv.slice(2);
neonConfig.wsProxy = () => `${hostPort}/v2`;
neonConfig.useSecureWebSocket = false;
neonConfig.pipelineConnect = pipeline === 'false' ? false : pipeline;

const cases = {
  params: async () => {
    const pool = new Pool({ connectionString });
    try {
      const { rows } = await pool.query('SELECT $1::int + 1 AS n, $2::text AS t', [41, 'hé']);
      return rows;
    } finally {
      await pool.end();
    }
  },
  transaction: async () => {
    const client = new Client(connectionString);
    await client.connect();
    try {
      await client.query('BEGIN');
      await client.query('CREATE TEMP TABLE ws_t (n int) ON COMMIT DROP');
      await client.query('INSERT INTO ws_t VALUES ($1), ($2)', [1, 2]);
      const { rows } = await client.query('SELECT sum(n)::int AS s, txid_current_if_assigned() IS NOT NULL AS x FROM ws_t');
      await client.query('COMMIT');
      return rows;
    } finally {
      await client.end();
    }
  },
  error: async () => {
    const client = new Client(connectionString);
    await client.connect();
    try {
      await client.query('SELECT 1/0');
    } finally {
      await client.end();
    }
  },
};

try {
  const result = await cases[which]();
  console.log(JSON.stringify({ ok: result }));
} catch (error) {
  const fields = {};
  for (const key of ['name', 'message', 'code', 'severity']) {
    fields[key] = error[key];
  }
  console.log(JSON.stringify({ error: fields }));
}
