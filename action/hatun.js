'use strict';
// Running hatun and probing the host for what it needs: root through `sudo -n` (never a password
// prompt), an environment for each child that carries no secret it does not need, and the checks
// that decide which system packages are missing.

const fs = require('fs');
const os = require('os');
const path = require('path');
const { spawn } = require('child_process');

function isRoot() {
  return typeof process.getuid === 'function' && process.getuid() === 0;
}

/**
 * [file, args] that run FILE ARGS as root: as they are when we are root, else through `sudo -n`
 * (fails at once instead of prompting) keeping only the variables named in PRESERVE (sudo resets
 * the environment otherwise).
 */
function privileged(file, args, { preserve = [] } = {}) {
  if (isRoot()) return [file, args];
  const options = ['-n'];
  if (preserve.length) options.push(`--preserve-env=${preserve.join(',')}`);
  return ['sudo', [...options, '--', file, ...args]];
}

/**
 * The environment of a child: ours without the action's inputs and saved state (INPUT_SECRETS is
 * among them) and without any variable whose value holds one of SECRET_VALUES; then EXTRA.
 */
function childEnv(secretValues, extra = {}) {
  const env = {};
  for (const [name, value] of Object.entries(process.env)) {
    if (name.startsWith('INPUT_') || name.startsWith('STATE_')) continue;
    if (secretValues.some((s) => s && value.includes(s))) continue;
    env[name] = value;
  }
  return Object.assign(env, extra);
}

/**
 * Signal process group PGID through `sudo -n kill` (a child under sudo runs as root, out of our
 * reach). Fire and forget, bounded: the helper is killed after 10 s and never waited for.
 */
function sudoKill(pgid, signal) {
  try {
    const helper = spawn('sudo', ['-n', 'kill', '-s', signal.replace(/^SIG/, ''), '--', `-${pgid}`],
      { stdio: 'ignore', detached: true });
    helper.on('error', () => {});
    const timer = setTimeout(() => { try { helper.kill('SIGKILL'); } catch (_) { /* gone */ } }, 10000);
    timer.unref();
    helper.on('exit', () => clearTimeout(timer));
    helper.unref();
  } catch (_) {
    // Nothing more to try: the runner kills the process tree at the end of the step.
  }
}

/** Absolute path of executable NAME on PATH (plus the sbin directories a non-root PATH may lack), or null. */
function which(name, extraDirs = ['/usr/local/sbin', '/usr/sbin', '/sbin']) {
  const dirs = [...(process.env.PATH || '').split(path.delimiter), ...extraDirs].filter(Boolean);
  for (const dir of dirs) {
    const candidate = path.join(dir, name);
    try {
      fs.accessSync(candidate, fs.constants.X_OK);
      if (fs.statSync(candidate).isFile()) return candidate;
    } catch (_) { /* not here */ }
  }
  return null;
}

/**
 * True when this kernel has WireGuard: loaded, built in, or a module that can be loaded (hatun asks
 * the kernel for its netlink family, which loads the module). Read from files, no child process.
 */
function kernelHasWireGuard() {
  if (fs.existsSync('/sys/module/wireguard')) return true;
  const dir = path.join('/lib/modules', os.release());
  for (const file of ['modules.builtin', 'modules.dep']) {
    try {
      if (/(^|\/)wireguard\.ko/m.test(fs.readFileSync(path.join(dir, file), 'utf8'))) return true;
    } catch (_) { /* no such file: not this way */ }
  }
  return false;
}

module.exports = { isRoot, privileged, childEnv, sudoKill, which, kernelHasWireGuard };
