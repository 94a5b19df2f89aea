// Runs neon() (HTTP mode) against pypooler: node neon_http.mjs <endpoint> <connection string> <case>
// Prints one JSON line: {"ok": result} or {"error": {message, code, ...}}.
import { neon, neonConfig } from '@neondatabase/serverless';

const [endpoint, connectionString, which] = process.argv.slice(2);
neonConfig.fetchEndpoint = endpoint;
const sql = neon(connectionString);

const cases = {
  params: () => sql`SELECT ${7}::int AS n, ${'hé'}::text AS t, ${true}::bool AS b, ${null}::int AS z,
    ${new Date('2024-01-02T03:04:05Z')}::timestamptz AS d, ${[1, 2]}::int[] AS a, ${{ k: 1 }}::jsonb AS j`,
  full: () => sql.query('SELECT $1::int8 AS big', ['9007199254740993'], { fullResults: true, arrayMode: true }),
  transaction: () => sql.transaction(
    [sql`SELECT current_setting('transaction_isolation') AS i`,
     sql`SELECT current_setting('transaction_read_only') AS r`],
    { isolationLevel: 'RepeatableRead', readOnly: true }),
  error: () => sql`SELECT 1/0`,
  badpassword: () => sql`SELECT 1`,
};

try {
  const result = await cases[which]();
  console.log(JSON.stringify({ ok: result }));
} catch (error) {
  const fields = {};
  for (const key of ['name', 'message', 'code', 'severity', 'detail', 'hint', 'position', 'routine']) {
    fields[key] = error[key];
  }
  console.log(JSON.stringify({ error: fields }));
}
