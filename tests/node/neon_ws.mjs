// Runs the driver's Pool/Client over a WebSocket to pypooler:
//   node --experimental-websocket neon_ws.mjs <ws|wss>://host:port <connection string> <pipelineConnect> <case> [table]
// <pipelineConnect>: "password" (the driver's default: startup and password without waiting) or "false".
// wss:// verifies pypooler's certificate (a test CA comes in through NODE_EXTRA_CA_CERTS).
// Prints one JSON line: {"ok": result} or {"error": {message, code, ...}}.
import { Pool, Client, neonConfig } from '@neondatabase/serverless';
import { from as copyFrom } from 'pg-copy-streams';
import { pipeline as pump } from 'node:stream/promises';
import { Readable } from 'node:stream';

const [url, connectionString, pipeline, which, table] = process.argv.slice(2);
const { protocol, host } = new URL(url);
neonConfig.wsProxy = () => `${host}/v2`;
neonConfig.useSecureWebSocket = protocol === 'wss:';
neonConfig.pipelineConnect = pipeline === 'false' ? false : pipeline;

function errorFields(error) {
  const fields = {};
  for (const key of ['name', 'message', 'code', 'severity']) {
    fields[key] = error[key];
  }
  return fields;
}

async function connected() {
  const client = new Client(connectionString);
  await client.connect();
  return client;
}

// A query's answer or its error, so one run can report several of each.
async function settle(promise) {
  try {
    return { ok: await promise };
  } catch (error) {
    return { error: { code: error.code, message: error.message } };
  }
}

// COPY ... TO STDOUT through node-postgres's Submittable interface: the driver's Client hands
// each CopyData to the active query. (pg-copy-streams' copyTo cannot be used: it reads the
// connection's stream as a Node Readable, and the driver's socket is an EventEmitter only.)
function copyOut(text) {
  const chunks = [];
  let resolve, reject;
  const done = new Promise((res, rej) => { resolve = res; reject = rej; });
  let command = null;
  return {
    done,
    submit(connection) { connection.query(text); },
    handleCopyData(message) { chunks.push(message.chunk); },
    handleCommandComplete(message) { command = message.text; },
    // node-postgres drops the active query at an error: ReadyForQuery does not reach it then.
    handleError(error) { reject(error); },
    handleReadyForQuery() { resolve({ command, data: Buffer.concat(chunks).toString() }); },
  };
}

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
    const client = await connected();
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
    const client = await connected();
    try {
      await client.query('SELECT 1/0');
    } finally {
      await client.end();
    }
  },
  // node-postgres named queries: Parse once per connection, then Bind/Execute only. Two clients
  // give the same name to different statements; each takes turns holding a transaction while
  // the other runs its statement, so in transaction mode each runs on both servers.
  prepared: async () => {
    const a = await connected();
    const b = await connected();
    const pool = new Pool({ connectionString, max: 2 });
    const calcA = (v) => ({ name: 'calc', text: 'SELECT $1::int * 2 AS v, pg_backend_pid() AS pid', values: [v] });
    const calcB = (v) => ({ name: 'calc', text: "SELECT $1::text || '!' AS v, pg_backend_pid() AS pid", values: [v] });
    const pids = { a: new Set(), b: new Set() };
    const values = { a: [], b: [] };
    const run = async (who, client, query) => {
      const { rows: [row] } = await client.query(query);
      pids[who].add(row.pid);
      values[who].push(row.v);
    };
    try {
      for (let round = 0; round < 3; round++) {
        const [holder, holderName, holderCalc, other, otherName, otherCalc] =
          round % 2 === 0 ? [a, 'a', calcA, b, 'b', calcB] : [b, 'b', calcB, a, 'a', calcA];
        await holder.query('BEGIN');
        await run(holderName, holder, holderCalc(round));
        await run(otherName, other, otherCalc(String(round)));
        await holder.query('COMMIT');
      }
      const errors = {
        executeFails: await settle(a.query({ name: 'div', text: 'SELECT 10 / $1::int AS r', values: [0] })),
        sameStatementAgain: await settle(a.query({ name: 'div', text: 'SELECT 10 / $1::int AS r', values: [5] }).then((r) => r.rows)),
        parseFails: await settle(b.query({ name: 'bad', text: 'SELEC $1::int', values: [1] })),
      };
      await b.query('BEGIN');
      errors.inTransaction = await settle(b.query({ name: 'div2', text: 'SELECT 10 / $1::int AS r', values: [0] }));
      errors.afterFailure = await settle(b.query(calcB('x')));
      await b.query('ROLLBACK');
      await run('b', b, calcB('after'));
      const poolRows = await Promise.all([1, 2, 3, 4, 5, 6].map((v) =>
        pool.query({ name: 'pooled', text: 'SELECT $1::int + 100 AS v', values: [v] }).then((r) => r.rows[0].v)));
      return { values, servers: { a: pids.a.size, b: pids.b.size }, errors, poolRows };
    } finally {
      await Promise.all([a.end(), b.end(), pool.end()]);
    }
  },
  // COPY in (pg-copy-streams) and out (copyOut above), one COPY whose data fails midway, one the
  // client abandons (CopyFail), one refused at once: the connection goes on after each.
  copy: async () => {
    const client = await connected();
    const count = async () => (await client.query(`SELECT count(*)::int AS n FROM ${table}`)).rows[0].n;
    try {
      const result = {};
      const into = client.query(copyFrom(`COPY ${table} (n, t) FROM STDIN`));
      await pump(Readable.from(['1\tone\n', '2\ttwo\n', '3\t\\N\n']), into);
      result.in = into.rowCount;
      result.out = await client.query(copyOut(`COPY (SELECT n, t FROM ${table} ORDER BY n) TO STDOUT`)).done;
      result.badRow = await settle(pump(Readable.from(['4\tfour\n', 'five\t5\n', '6\tsix\n']),
        client.query(copyFrom(`COPY ${table} (n, t) FROM STDIN`))));
      result.afterBadRow = await count();
      const abandoned = client.query(copyFrom(`COPY ${table} (n, t) FROM STDIN`));
      abandoned.write('7\tseven\n');
      result.abandoned = await settle(new Promise((resolve, reject) => {
        abandoned.on('error', reject);
        abandoned.on('close', resolve);
        abandoned.destroy(new Error('the client gave up'));
      }));
      result.afterAbandoned = await count();
      result.outRefused = await settle(client.query(copyOut('COPY no_such_table TO STDOUT')).done);
      await client.query('BEGIN');
      const inTransaction = client.query(copyFrom(`COPY ${table} (n, t) FROM STDIN`));
      await pump(Readable.from(['8\teight\n']), inTransaction);
      await client.query('ROLLBACK');
      result.afterRollback = await count();
      return result;
    } finally {
      await client.end();
    }
  },
  // BEGIN and an INSERT, then the process ends without a word: no COMMIT, no Terminate, no
  // close frame (the kernel closes the socket).
  abandon: async () => {
    const client = await connected();
    await client.query('BEGIN');
    await client.query(`INSERT INTO ${table} (n) VALUES (1)`);
    console.log(JSON.stringify({ ok: 'inserted' }));
    process.exit(0);
  },
};

try {
  const result = await cases[which]();
  console.log(JSON.stringify({ ok: result }));
} catch (error) {
  console.log(JSON.stringify({ error: errorFields(error) }));
}
