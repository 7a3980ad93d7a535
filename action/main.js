'use strict';
// The main step: check the inputs, install what is missing, install hatun into a virtual
// environment of its own, run `hatun up` (bounded, retried), report. Whatever it started, the post
// step (post.js) removes, also when this step fails or is cancelled.

const fs = require('fs');
const os = require('os');
const path = require('path');

const gh = require('./github');
const { Children, Cancelled, describe } = require('./process');
const { readInputs, keyEnvNames, enrolls, wantsUserspace, missingPackages } = require('./inputs');
const report = require('./report');
const hatun = require('./hatun');

// Beyond `--wait`: what `hatun up` may take to clean up after a failed wait (its own `down` is
// bounded by 30 s) before we stop it.
const UP_GRACE_S = 60;
const DOWN_TIMEOUT_MS = 90 * 1000;
const QUICK_TIMEOUT_MS = 30 * 1000; // version checks, `hatun status`
const RETRY_PAUSE_MS = 2000;
const MIN_PYTHON = [3, 11];

const children = new Children({ sudoKill: hatun.sudoKill });

// The runner cancels a step with SIGINT, then SIGTERM 7.5 s later, then kills the process tree
// 2.5 s after that. The first signal stops every child (and nothing new starts): SIGTERM, SIGKILL
// 3 s later, given up on 2 s after that, so the step is gone well within the 7.5 s. A second signal
// means we were too slow all the same: kill and leave at once. Either way the post step runs and
// cleans up.
function onSignal(signal) {
  if (children.cancelled) {
    children.killNow();
    gh.error(`hatun action: ${signal} while stopping: exiting now; the post step removes whatever hatun started`);
    process.exit(1);
  }
  gh.info(`hatun action: received ${signal}: stopping`);
  children.cancel(signal);
}
process.on('SIGINT', onSignal);
process.on('SIGTERM', onSignal);

function check(result) {
  if (result.cancelled) throw new Cancelled(children.cancelled);
  return result;
}

function seconds(start) {
  return Number(process.hrtime.bigint() - start) / 1e9;
}

/** Run FILE ARGS with its output shown verbatim (inside the current group); resolves with its result. */
async function shown(file, args, options) {
  const out = gh.verbatim();
  try {
    return check(await children.run(file, args, { ...options, onStdout: out.write, onStderr: out.write }));
  } finally {
    out.end();
  }
}

/** Python ready to make a venv? {version, venv} or a message. */
async function probePython(python, env) {
  const code = 'import sys; print("%d.%d" % sys.version_info[:2])\n'
    + 'try:\n import venv, ensurepip\n print("venv")\nexcept ImportError:\n print("no-venv")';
  const r = check(await children.run(python, ['-c', code], { timeoutMs: QUICK_TIMEOUT_MS, env }));
  if (r.code !== 0) return { problem: `python: ${python} ${describe(r, QUICK_TIMEOUT_MS)}${r.stderr ? ': ' + r.stderr.trim() : ''}` };
  const [version, venv] = r.stdout.trim().split('\n');
  const [major, minor] = version.split('.').map(Number);
  if (major < MIN_PYTHON[0] || (major === MIN_PYTHON[0] && minor < MIN_PYTHON[1])) {
    return { problem: `python: ${python} is Python ${version}; hatun needs ${MIN_PYTHON.join('.')} or newer (ubuntu-24.04 has 3.12;`
      + ' elsewhere run actions/setup-python first and give its python here)' };
  }
  return { version, venv: venv === 'venv' };
}

/** Install PACKAGES with apt-get, bounded; an update of the lists only if the first try fails. */
async function aptInstall(packages, timeoutMs, env) {
  if (!hatun.which('apt-get')) return `cannot install ${packages.join(', ')}: no apt-get here; install them before this step`;
  const aptEnv = { ...env, DEBIAN_FRONTEND: 'noninteractive' };
  // The lock timeout: unattended upgrades on a fresh runner may hold dpkg's lock for a while.
  const install = hatun.privileged('apt-get', ['install', '-y', '-q', '--no-install-recommends',
    '-o', 'DPkg::Lock::Timeout=60', ...packages]);
  let r = await shown(install[0], install[1], { timeoutMs, env: aptEnv, sudo: !hatun.isRoot() });
  if (r.code === 0) return null;
  const update = hatun.privileged('apt-get', ['update', '-q', '-o', 'DPkg::Lock::Timeout=60']);
  r = await shown(update[0], update[1], { timeoutMs, env: aptEnv, sudo: !hatun.isRoot() });
  if (r.code === 0) r = await shown(install[0], install[1], { timeoutMs, env: aptEnv, sudo: !hatun.isRoot() });
  return r.code === 0 ? null : `apt-get install ${packages.join(' ')}: ${describe(r, timeoutMs)}`;
}

/**
 * The inputs, checked, with the config read: {inputs, configText, configPath, keyEnv, env}, or null
 * after reporting every problem. KEYENV: the variables `hatun up` gets (the config's
 * private_key_env names, from the secrets input or, less tidy but allowed, the step's own env);
 * ENV: the environment of every other child.
 */
function checkInputs() {
  const inputs = readInputs(process.env);
  // Masked first of all: nothing below may print them, but should anything ever do, the log shows ***.
  for (const value of Object.values(inputs.secrets.env)) gh.mask(value);
  let configPath = null;
  let configText = null;
  if (inputs.config && inputs.config.inline) {
    configText = inputs.config.text;
  } else if (inputs.config) {
    configPath = inputs.config.path;
    try {
      configText = fs.readFileSync(configPath, 'utf8');
    } catch (e) {
      inputs.problems.push(`config: cannot read ${configPath}: ${e.code === 'ENOENT' ? 'no such file' : e.message}`
        + ' (a one-line value is the path of a config file, relative to the workspace; inline TOML spans several lines)');
    }
  }
  const keyEnv = {};
  const missing = [];
  for (const name of configText === null ? [] : keyEnvNames(configText)) {
    if (name in inputs.secrets.env) {
      keyEnv[name] = inputs.secrets.env[name];
    } else if (process.env[name]) {
      keyEnv[name] = process.env[name];
      gh.mask(process.env[name]);
    } else {
      missing.push(name);
    }
  }
  // Keyless tunnels (enroll =): hatun fetches the job's OIDC token itself, with these two variables,
  // which the runner sets only for a job with `permissions: id-token: write`.
  if (configText !== null && enrolls(configText)) {
    for (const name of ['ACTIONS_ID_TOKEN_REQUEST_URL', 'ACTIONS_ID_TOKEN_REQUEST_TOKEN']) {
      if (process.env[name]) {
        keyEnv[name] = process.env[name];
      } else {
        inputs.problems.push(`the config enrolls its tunnels (enroll = ...), which needs the job's OIDC token: add`
          + ' `permissions: id-token: write` to the job (' + name + ' is not set)');
        break;
      }
    }
    if (keyEnv.ACTIONS_ID_TOKEN_REQUEST_TOKEN) gh.mask(keyEnv.ACTIONS_ID_TOKEN_REQUEST_TOKEN);
  }
  if (missing.length) {
    inputs.problems.push(`secrets: the config reads private_key_env / preshared_key_env ${missing.map((n) => `"${n}"`).join(', ')}, which`
      + ' the secrets input does not give (add a line NAME=${{ secrets.NAME }} for each)');
  }
  if (inputs.problems.length) {
    for (const problem of inputs.problems) gh.error(problem, { title: 'hatun: bad input' });
    return null;
  }
  for (const name of inputs.secrets.names) {
    if (!(name in keyEnv)) gh.warning(`secrets: ${name} is not used by the config (no private_key_env or preshared_key_env = "${name}"); it is not passed to hatun`);
  }
  const env = hatun.childEnv(Object.values(keyEnv).concat(Object.values(inputs.secrets.env)));
  return { inputs, configText, configPath, keyEnv, env };
}

/** Install the system packages hatun lacks (as system-packages says); false after reporting a failure. */
async function installSystemPackages(job) {
  const { inputs, env } = job;
  const python = await probePython(inputs.python, env);
  if (python.problem) {
    gh.error(python.problem, { title: 'hatun: cannot install' });
    return false;
  }
  const needed = missingPackages({
    haveNft: hatun.which('nft') !== null,
    kernelWireGuard: hatun.kernelHasWireGuard(),
    haveWireguardGo: hatun.which('wireguard-go') !== null,
    wantsUserspace: wantsUserspace(job.configText),
    haveVenv: python.venv,
  });
  if (!needed.length) {
    gh.info('system packages: nothing missing');
    return true;
  }
  if (inputs.systemPackages !== 'auto') {
    gh.warning(`system-packages is false but ${needed.join(', ')} ${needed.length > 1 ? 'are' : 'is'} missing: hatun may not work`);
    return true;
  }
  gh.startGroup(`Install ${needed.join(', ')}`);
  let problem;
  try {
    problem = await aptInstall(needed, inputs.installTimeout * 1000, env);
  } finally {
    gh.endGroup();
  }
  if (problem) gh.error(problem, { title: 'hatun: cannot install' });
  return !problem;
}

/**
 * hatun in a virtual environment of its own under WORKDIR (the system Python is externally
 * managed, PEP 668): {hatunBin, bin, seconds, venvSeconds}, or null after reporting a failure.
 */
async function installHatun(job, workdir) {
  const { inputs, env } = job;
  const timeoutMs = inputs.installTimeout * 1000;
  const venv = path.join(workdir, 'venv');
  const bin = path.join(venv, 'bin');
  const hatunBin = path.join(bin, 'hatun');
  const requirement = inputs.package || process.env.GITHUB_ACTION_PATH || path.resolve(__dirname, '..');
  gh.startGroup(`Install hatun (${requirement}) into ${venv}`);
  const start = process.hrtime.bigint();
  let venvSeconds = 0;
  let problem = null;
  try {
    let r = await shown(inputs.python, ['-m', 'venv', venv], { timeoutMs, env });
    venvSeconds = seconds(start);
    if (r.code !== 0) problem = `${inputs.python} -m venv ${describe(r, timeoutMs)}`;
    if (!problem) {
      r = await shown(path.join(bin, 'python'), ['-m', 'pip', 'install', '--disable-pip-version-check', '--no-input',
        '--progress-bar', 'off', requirement], { timeoutMs, env });
      if (r.code !== 0) problem = `pip install ${requirement} ${describe(r, timeoutMs)}`;
    }
    if (!problem) {
      r = await shown(hatunBin, ['--version'], { timeoutMs: QUICK_TIMEOUT_MS, env });
      if (r.code !== 0) problem = `hatun --version ${describe(r, QUICK_TIMEOUT_MS)}`;
    }
  } finally {
    gh.endGroup();
  }
  if (problem) {
    gh.error(problem, { title: 'hatun: cannot install' });
    return null;
  }
  const total = seconds(start);
  gh.info(`hatun installed in ${total.toFixed(1)} s (venv ${venvSeconds.toFixed(1)} s, pip ${(total - venvSeconds).toFixed(1)} s)`);
  return { hatunBin, bin, seconds: total, venvSeconds };
}

/**
 * `hatun up`, attempt after attempt (`hatun down` in between), each bounded by the timeout plus
 * hatun's own clean-up. Returns {doc (hatun up's JSON), failure ({message, diagnoses}) or null,
 * attempts (made)}.
 */
async function bringUp(job, hatunBin) {
  const { inputs, env, keyEnv, configPath } = job;
  const sudo = !hatun.isRoot();
  const attempts = inputs.retry + 1;
  const upEnv = { ...env, ...keyEnv };
  const upTimeoutMs = (inputs.timeout + UP_GRACE_S) * 1000;
  let attempt = 0;
  for (;;) {
    attempt += 1;
    gh.info(`hatun up, attempt ${attempt} of ${attempts}: waiting up to ${inputs.timeout} s for`
      + ` ${inputs.minHealthy} healthy tunnel${inputs.minHealthy === 1 ? '' : 's'}`);
    const [file, args] = hatun.privileged(hatunBin, ['up', configPath, '--wait', String(inputs.timeout),
      '--min-healthy', String(inputs.minHealthy), '--json'], { preserve: Object.keys(keyEnv) });
    const r = check(await children.run(file, args, { timeoutMs: upTimeoutMs, env: upEnv, sudo }));
    let doc = null;
    try {
      doc = JSON.parse(r.stdout);
    } catch (_) {
      doc = null;
    }
    if (doc && doc.ok) return { doc, failure: null, attempts: attempt };
    const failure = {
      message: doc ? doc.message : `hatun up ${describe(r, upTimeoutMs)}${r.stderr.trim() ? ': ' + r.stderr.trim() : ''}`,
      diagnoses: (doc && doc.tunnels) || {},
    };
    if (sudo && /password is required|terminal is required/.test(r.stderr)) {
      failure.message += ' (hatun needs root: run the job as root, or give this user passwordless sudo as GitHub\'s runners do)';
    }
    // A usage error or an invalid config (exit 1 or 2 without a JSON answer) stays so: no retry.
    const retryable = doc !== null || r.timedOut || r.error !== null || ![1, 2].includes(r.code);
    if (!retryable) {
      failure.message += ' (not retried: trying again would not change it)';
      // hatun refused before starting anything (config, usage, sudo): nothing for the post step.
      if (attempt === 1) gh.saveState('started', 'false');
    }
    if (!retryable || attempt === attempts) return { doc, failure, attempts: attempt };
    gh.warning(`hatun up, attempt ${attempt} of ${attempts} failed: ${failure.message}${diagnosisLines(failure.diagnoses)}`);
    const [dfile, dargs] = hatun.privileged(hatunBin, ['down', configPath]);
    const d = check(await children.run(dfile, dargs, { timeoutMs: DOWN_TIMEOUT_MS, env, sudo }));
    gh.info(`hatun down before the next attempt: ${d.code === 0 ? 'done' : describe(d, DOWN_TIMEOUT_MS)}`);
    await children.sleep(RETRY_PAUSE_MS);
    if (children.cancelled) throw new Cancelled(children.cancelled);
  }
}

function diagnosisLines(diagnoses) {
  return Object.entries(diagnoses).map(([name, text]) => `\n  ${name}: ${text}`).join('');
}

/** hatun's status document (null when it cannot be read, after a warning). */
async function readStatus(job, hatunBin) {
  const [file, args] = hatun.privileged(hatunBin, ['status', '--json', '--config', job.configPath]);
  const r = check(await children.run(file, args, { timeoutMs: QUICK_TIMEOUT_MS, env: job.env, sudo: !hatun.isRoot() }));
  try {
    if (r.code === 0) return JSON.parse(r.stdout);
  } catch (_) {
    // reported below
  }
  gh.warning(`hatun status ${describe(r, QUICK_TIMEOUT_MS)}: the outputs come from hatun up alone`);
  return null;
}

async function run() {
  const t0 = process.hrtime.bigint();
  const job = checkInputs();
  if (!job) return 1;
  const workdir = fs.mkdtempSync(path.join(process.env.RUNNER_TEMP || os.tmpdir(), 'hatun-'));
  if (job.inputs.config.inline) {
    job.configPath = path.join(workdir, 'hatun.toml');
    fs.writeFileSync(job.configPath, job.configText, { mode: 0o600, flag: 'wx' });
  }
  if (!(await installSystemPackages(job))) return 1;
  const installed = await installHatun(job, workdir);
  if (!installed) return 1;
  gh.setOutput('hatun', installed.hatunBin);
  gh.setOutput('config', job.configPath);
  if (job.inputs.addToPath) gh.addPath(installed.bin);

  // From here on hatun may leave something behind: tell the post step before starting it.
  gh.saveState('hatun', installed.hatunBin);
  gh.saveState('config', job.configPath);
  gh.saveState('started', 'true');
  const tUp = process.hrtime.bigint();
  const { doc, failure, attempts } = await bringUp(job, installed.hatunBin);
  const upSeconds = seconds(tUp);
  const tries = `${attempts} attempt${attempts === 1 ? '' : 's'}`;
  if (failure) {
    gh.error(`hatun NOT up after ${tries}: ${failure.message}${diagnosisLines(failure.diagnoses)}`,
      { title: 'hatun: tunnels not up' });
    for (const [name, value] of Object.entries(report.outputsFromUp(null))) gh.setOutput(name, value);
    gh.appendSummary(report.failureSummary(failure.message, failure.diagnoses, attempts));
    return 1;
  }
  gh.saveState('up', 'true');

  const status = await readStatus(job, installed.hatunBin);
  const outputs = status ? report.outputsFromStatus(status) : report.outputsFromUp(doc);
  for (const [name, value] of Object.entries(outputs)) gh.setOutput(name, value);
  if (status) gh.appendSummary(report.upSummary(status, { attempts, upSeconds, installSeconds: installed.seconds }));
  gh.info(`hatun is up: ${outputs['tunnels-in-service']} tunnels in service (${outputs.tunnels}); ${doc.message}`);
  gh.info(`timing: install ${installed.seconds.toFixed(1)} s (venv ${installed.venvSeconds.toFixed(1)} s), hatun up`
    + ` ${upSeconds.toFixed(1)} s (${tries}), total ${seconds(t0).toFixed(1)} s`);
  return 0;
}

run().then(
  (code) => process.exit(code),
  (e) => {
    if (e instanceof Cancelled) {
      gh.error(`hatun action ${e.message}: stopped; the post step removes whatever hatun started`,
        { title: 'hatun: cancelled' });
    } else {
      gh.error(`hatun action: internal error: ${e && e.stack ? e.stack : e}`);
    }
    process.exit(1);
  },
);
