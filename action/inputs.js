'use strict';
// The action's inputs, parsed and checked without any I/O. Every problem is collected and named
// precisely (input name, line number), and no message ever quotes a value of the secrets input.

const path = require('path');
const { getInput, inputVariable } = require('./github');

const DURATION_RE = /^(\d+(?:\.\d+)?)\s*(s|m)?$/;

/** Seconds from "60", "60s", "1.5m"; a message naming INPUT otherwise. */
function parseDuration(input, text, { min = 1, max = 3600 } = {}) {
  const m = DURATION_RE.exec(text);
  if (!m) return { problem: `${input}: "${text}" is not a duration (seconds: 60, 60s or 2m)` };
  const seconds = Number(m[1]) * (m[2] === 'm' ? 60 : 1);
  if (seconds < min || seconds > max) return { problem: `${input}: ${text} is out of range (${min} s to ${max} s)` };
  return { value: seconds };
}

function parseCount(input, text, { min, max }) {
  if (!/^\d+$/.test(text)) return { problem: `${input}: "${text}" is not a whole number` };
  const n = Number(text);
  if (n < min || n > max) return { problem: `${input}: ${n} is out of range (${min} to ${max})` };
  return { value: n };
}

function parseBool(input, text) {
  const t = text.toLowerCase();
  if (t === 'true') return { value: true };
  if (t === 'false') return { value: false };
  return { problem: `${input}: "${text}" is neither true nor false` };
}

const NAME_RE = /^[A-Za-z_][A-Za-z0-9_]*$/;
// Variables that would change how hatun, Python, sudo or the loader behave, not carry a key.
const RESERVED_RE = /^(PATH|HOME|SHELL|USER|LOGNAME|TMPDIR|IFS|ENV|BASH_ENV|HATUN_DEBUG|PYTHON.*|(LD|SUDO|PIP|INPUT|STATE|GITHUB|RUNNER)_.*)$/;

/**
 * The secrets input: one NAME=VALUE per line (blank lines and lines starting with # ignored).
 * Returns {env: {NAME: VALUE}, names: [...], problems: [...]}; problems name the line by number
 * and never quote it (a malformed line may well be a key).
 */
function parseSecrets(text) {
  const env = {};
  const names = [];
  const problems = [];
  const lines = text.split(/\r?\n/);
  lines.forEach((raw, i) => {
    const where = `secrets, line ${i + 1}`;
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) return;
    const eq = line.indexOf('=');
    if (eq <= 0) {
      problems.push(`${where}: expected NAME=VALUE (the line is not shown: it may hold a secret)`);
      return;
    }
    const name = line.slice(0, eq).trim();
    const value = line.slice(eq + 1).trim();
    if (!NAME_RE.test(name)) {
      problems.push(`${where}: the name before "=" must be letters, digits and _ and not start with a digit`
        + ' (the line is not shown: it may hold a secret)');
    } else if (RESERVED_RE.test(name)) {
      problems.push(`${where}: ${name} is reserved (it would change how hatun, Python or sudo run): name the variable`
        + ' after its tunnel, e.g. HATUN_GW1_KEY, and use that name in private_key_env');
    } else if (Object.prototype.hasOwnProperty.call(env, name)) {
      problems.push(`${where}: ${name} is given twice`);
    } else if (value === '') {
      problems.push(`${where}: ${name} has an empty value (is the repository secret set and visible to this job?)`);
    } else {
      env[name] = value;
      names.push(name);
    }
  });
  return { env, names, problems };
}

/**
 * The config input: a value with a line break is inline TOML (a real config has tables, so it
 * spans lines; nothing has to be guessed from the content); one line is the path of a file,
 * relative to the workspace.
 */
function parseConfig(text, workspace) {
  if (text === '') return { problem: 'config: required (a path to a hatun config file, or the config itself as inline TOML)' };
  if (/[\r\n]/.test(text)) return { value: { inline: true, text: text.endsWith('\n') ? text : text + '\n' } };
  return { value: { inline: false, path: path.resolve(workspace || process.cwd(), text) } };
}

/** Names the config text reads keys from (private_key_env / preshared_key_env = "NAME"). */
function keyEnvNames(configText) {
  const names = [];
  const re = /^\s*(?:private|preshared)_key_env\s*=\s*["']([^"']*)["']/gm;
  let m;
  while ((m = re.exec(configText)) !== null) names.push(m[1]);
  return names;
}

/** True when the config text has a keyless tunnel (enroll = "https://..."): the job's OIDC token is needed. */
function enrolls(configText) {
  return /^\s*enroll\s*=\s*["']/m.test(configText);
}

/** True when the config text asks for wireguard-go whatever the kernel has (backend = "userspace"). */
function wantsUserspace(configText) {
  // Top level only: the first table header ends it.
  const top = configText.split(/^\s*\[/m)[0];
  return /^\s*backend\s*=\s*["']userspace["']/m.test(top);
}

/**
 * Every input of the action, checked: the parsed inputs (a value is undefined where its input is
 * wrong) with `problems`, every mistake found. ENV: the environment holding INPUT_* (the runner's);
 * relative paths start at its GITHUB_WORKSPACE.
 */
function readInputs(env = process.env) {
  const problems = [];
  const take = (parsed) => {
    if (parsed.problem) problems.push(parsed.problem);
    return parsed.value;
  };
  const get = (name) => getInput(name, env);
  const workspace = env.GITHUB_WORKSPACE || process.cwd();
  const secrets = parseSecrets(env[inputVariable('secrets')] || '');
  problems.push(...secrets.problems);
  const systemPackages = get('system-packages') || 'auto';
  if (!['auto', 'false'].includes(systemPackages)) problems.push(`system-packages: "${systemPackages}" is neither auto nor false`);
  const inputs = {
    config: take(parseConfig(get('config'), workspace)),
    secrets,
    package: get('package'),
    python: get('python') || 'python3',
    timeout: take(parseDuration('timeout', get('timeout') || '60', { min: 1, max: 3600 })),
    retry: take(parseCount('retry', get('retry') || '2', { min: 0, max: 10 })),
    minHealthy: take(parseCount('min-healthy', get('min-healthy') || '1', { min: 1, max: 64 })),
    systemPackages,
    installTimeout: take(parseDuration('install-timeout', get('install-timeout') || '300', { min: 10, max: 3600 })),
    addToPath: take(parseBool('add-to-path', get('add-to-path') || 'true')),
    problems,
  };
  return inputs;
}

/**
 * Debian/Ubuntu packages to install before hatun can run (pure): nftables for flow pinning (nft),
 * wireguard-go where the kernel has no WireGuard or the config wants userspace, python3-venv where
 * the Python cannot make a virtual environment.
 */
function missingPackages({ haveNft, kernelWireGuard, haveWireguardGo, wantsUserspace: userspace, haveVenv }) {
  const out = [];
  if (!haveNft) out.push('nftables');
  if ((userspace || !kernelWireGuard) && !haveWireguardGo) out.push('wireguard-go');
  if (!haveVenv) out.push('python3-venv');
  return out;
}

module.exports = {
  enrolls,
  parseDuration, parseCount, parseBool, parseSecrets, parseConfig, keyEnvNames, wantsUserspace,
  readInputs, missingPackages,
};
