'use strict';
// Child processes with a bound on everything: each runs in its own process group with a timeout,
// gets SIGTERM and then SIGKILL when the timeout expires or the step is cancelled, and is given up
// on (its pipes closed, never waited for again) if even that does not end it. A step therefore
// cannot hang on a child, the complaint of tailscale/github-action#134.

const { spawn } = require('child_process');

const MAX_CAPTURE = 1024 * 1024; // bytes kept of a child's stdout and of its stderr
const STREAM_DRAIN_MS = 1000; // after a child exited: how long its pipes may stay open (a grandchild holding them)
const ABANDON_MS = 2000; // after SIGKILL: how long to wait before giving up on a child

class Cancelled extends Error {
  constructor(signal) {
    super(`cancelled (${signal})`);
    this.signal = signal;
  }
}

/**
 * Every child of this step. `cancel(signal)` stops all of them (SIGTERM, then SIGKILL after the
 * grace) and makes every later `run` and `sleep` end at once with `cancelled` set.
 */
class Children {
  constructor({ killGraceMs = 3000, sudoKill = null } = {}) {
    this.running = new Set();
    this.cancelled = null;
    this.killGraceMs = killGraceMs;
    // How to signal a group we may not signal ourselves (a child under sudo runs as root):
    // (pgid, signal) => void. Null: nothing more to try.
    this.sudoKill = sudoKill;
    this.sleepers = new Set();
  }

  cancel(signal) {
    if (!this.cancelled) this.cancelled = signal;
    for (const entry of [...this.running]) entry.terminate('cancelled');
    for (const wake of [...this.sleepers]) wake();
  }

  /** SIGKILL every child's process group now: the step is about to exit. */
  killNow() {
    for (const entry of this.running) entry.signal('SIGKILL');
  }

  /** Wait MS milliseconds, or less when the step is cancelled meanwhile. */
  sleep(ms) {
    if (this.cancelled) return Promise.resolve();
    return new Promise((resolve) => {
      const wake = () => {
        clearTimeout(timer);
        this.sleepers.delete(wake);
        resolve();
      };
      const timer = setTimeout(wake, ms);
      this.sleepers.add(wake);
    });
  }

  /**
   * Run FILE with ARGS and resolve (never reject) with
   * {code, signal, stdout, stderr, timedOut, cancelled, error, seconds}.
   *
   * Options: timeoutMs (required), env, onStdout/onStderr (called with each chunk as text), sudo
   * (the child runs under sudo: signal it through `sudoKill` where we may not).
   */
  run(file, args, { timeoutMs, env = process.env, onStdout = null, onStderr = null, sudo = false } = {}) {
    if (!(timeoutMs > 0)) throw new Error(`run ${file}: a timeout is required`);
    const result = {
      code: null, signal: null, stdout: '', stderr: '', timedOut: false, cancelled: false, error: null, seconds: 0,
    };
    if (this.cancelled) {
      result.cancelled = true;
      return Promise.resolve(result);
    }
    const started = process.hrtime.bigint();
    return new Promise((resolve) => {
      let child;
      try {
        // detached: a process group of its own, so that the whole group (the child and what it
        // started in the foreground) can be signalled; stdin closed: nothing ever waits for input.
        child = spawn(file, args, { env, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
      } catch (e) {
        result.error = e;
        resolve(result);
        return;
      }
      let reason = null;
      let done = false;
      const timers = [];
      const later = (ms, fn) => timers.push(setTimeout(fn, ms));

      const signalGroup = (sig) => {
        try {
          process.kill(-child.pid, sig);
        } catch (e) {
          if (e.code === 'EPERM' && sudo && this.sudoKill) this.sudoKill(child.pid, sig);
          else if (e.code !== 'ESRCH') {
            try { child.kill(sig); } catch (_) { /* gone */ }
          }
        }
      };
      const finish = () => {
        if (done) return;
        done = true;
        for (const t of timers) clearTimeout(t);
        this.running.delete(entry);
        for (const stream of [child.stdout, child.stderr]) if (stream) stream.destroy();
        child.unref();
        result.seconds = Number(process.hrtime.bigint() - started) / 1e9;
        resolve(result);
      };
      const terminate = (why) => {
        if (reason || done) return;
        reason = why;
        if (why === 'timeout') result.timedOut = true;
        else result.cancelled = true;
        signalGroup('SIGTERM');
        later(this.killGraceMs, () => {
          signalGroup('SIGKILL');
          later(ABANDON_MS, finish);
        });
      };
      const entry = { child, terminate, signal: signalGroup };
      this.running.add(entry);

      const collect = (key, callback) => (chunk) => {
        const text = chunk.toString('utf8');
        if (result[key].length < MAX_CAPTURE) result[key] += text.slice(0, MAX_CAPTURE - result[key].length);
        if (callback) callback(text);
      };
      child.stdout.on('data', collect('stdout', onStdout));
      child.stderr.on('data', collect('stderr', onStderr));
      child.on('error', (e) => {
        // Spawning failed (ENOENT, EACCES): no exit event follows.
        result.error = e;
        finish();
      });
      child.on('exit', (code, signal) => {
        result.code = code;
        result.signal = signal;
        // Normally the pipes close right after; a grandchild that kept them open must not hold us.
        later(STREAM_DRAIN_MS, finish);
      });
      child.on('close', finish);
      later(timeoutMs, () => terminate('timeout'));
    });
  }
}

/** One line saying how RESULT ended, for messages: "exit status 1", "timed out after 60 s", ... */
function describe(result, timeoutMs) {
  if (result.error) return `could not be started: ${result.error.message}`;
  if (result.cancelled) return 'stopped: the step was cancelled';
  if (result.timedOut) return `timed out after ${Math.round(timeoutMs / 1000)} s and was stopped`;
  if (result.signal) return `killed by ${result.signal}`;
  return `exit status ${result.code}`;
}

module.exports = { Children, Cancelled, describe };
