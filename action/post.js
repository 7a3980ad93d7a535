'use strict';
// The post step (runs always: after success, failure and cancellation of the job): `hatun down`,
// bounded, and a report of what it removed. It fails the job only when a hatun that did come up
// could not be torn down; a teardown of something that never came up is never an error.

const gh = require('./github');
const { Children, describe } = require('./process');
const { parseSecrets } = require('./inputs');
const report = require('./report');
const hatun = require('./hatun');

const DOWN_TIMEOUT_MS = 90 * 1000;

const children = new Children({ sudoKill: hatun.sudoKill });

// A cancel that reaches the post step (a second cancel of the job): the teardown is bounded and is
// exactly what the cancel wants done, so it goes on; the runner's final kill is the limit.
function onSignal(signal) {
  gh.info(`hatun action: received ${signal}: finishing the teardown first (at most ${DOWN_TIMEOUT_MS / 1000} s)`);
}
process.on('SIGINT', onSignal);
process.on('SIGTERM', onSignal);

async function run() {
  const hatunBin = gh.getState('hatun');
  const configPath = gh.getState('config');
  if (gh.getState('started') !== 'true' || !hatunBin || !configPath) {
    gh.info('hatun down: the main step did not start hatun; nothing to tear down');
    return 0;
  }
  const wasUp = gh.getState('up') === 'true';
  // The post step gets the inputs again (the secrets among them): keep them from `hatun down`.
  const secretValues = Object.values(parseSecrets(process.env[gh.inputVariable('secrets')] || '').env);
  const env = hatun.childEnv(secretValues);
  const [file, args] = hatun.privileged(hatunBin, ['down', configPath]);
  gh.info(`hatun down ${configPath}`);
  const r = await children.run(file, args, { timeoutMs: DOWN_TIMEOUT_MS, env, sudo: !hatun.isRoot() });
  const said = `${r.stdout}${r.stderr}`;
  gh.echoVerbatim(said);
  const ok = r.code === 0;
  gh.appendSummary(report.downSummary(ok, ok ? said : `${said}\nhatun down ${describe(r, DOWN_TIMEOUT_MS)}`));
  if (ok) return 0;
  const message = `hatun down ${describe(r, DOWN_TIMEOUT_MS)}`;
  if (wasUp) {
    gh.error(`${message}: tunnels, routes or the background hatun may be left on this runner`, { title: 'hatun: teardown failed' });
    return 1;
  }
  gh.warning(`${message} (hatun never came up in this job, so there is little to remove)`);
  return 0;
}

run().then(
  (code) => process.exit(code),
  (e) => {
    // Never let a bug of the post step hide the job's real result; say it loudly all the same.
    gh.warning(`hatun action (post): internal error: ${e && e.stack ? e.stack : e}`);
    process.exit(0);
  },
);
