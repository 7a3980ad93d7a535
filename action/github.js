'use strict';
// The few parts of the GitHub Actions runner protocol this action needs, without @actions/core:
// inputs (INPUT_<NAME> variables), workflow commands on stdout (::error::, ::add-mask::, ::group::,
// ::stop-commands::) and file commands (GITHUB_OUTPUT, GITHUB_STATE, GITHUB_PATH,
// GITHUB_STEP_SUMMARY). Everything else of the action is ordinary Node.

const crypto = require('crypto');
const fs = require('fs');
const os = require('os');

/** The variable the runner sets for input NAME: upper case, spaces become "_", hyphens stay. */
function inputVariable(name) {
  return `INPUT_${name.replace(/ /g, '_').toUpperCase()}`;
}

/** Input NAME as the runner gave it (defaults from action.yml applied), trimmed. */
function getInput(name, env = process.env) {
  return (env[inputVariable(name)] || '').trim();
}

/** What the post step finds of a value the main step saved with saveState(NAME). */
function getState(name, env = process.env) {
  return env[`STATE_${name}`] || '';
}

// Workflow command escaping: a command is one line, so its data may not hold raw line breaks, and
// its properties may not hold the separators either.
function escapeData(value) {
  return String(value).replace(/%/g, '%25').replace(/\r/g, '%0D').replace(/\n/g, '%0A');
}

function escapeProperty(value) {
  return escapeData(value).replace(/:/g, '%3A').replace(/,/g, '%2C');
}

/** The text of workflow command NAME with PROPERTIES (an object) and MESSAGE. */
function formatCommand(name, properties, message) {
  const props = Object.entries(properties || {})
    .filter(([, v]) => v !== undefined && v !== null && v !== '')
    .map(([k, v]) => `${k}=${escapeProperty(v)}`)
    .join(',');
  return `::${name}${props ? ' ' + props : ''}::${escapeData(message)}`;
}

function issue(name, properties, message) {
  process.stdout.write(formatCommand(name, properties, message) + os.EOL);
}

function info(message) {
  process.stdout.write(`${message}${os.EOL}`);
}

function error(message, properties) {
  issue('error', properties, message);
}

function warning(message, properties) {
  issue('warning', properties, message);
}

function notice(message, properties) {
  issue('notice', properties, message);
}

/** Ask the runner to replace VALUE by *** in every later log line. */
function mask(value) {
  if (value) issue('add-mask', {}, value);
}

function startGroup(title) {
  issue('group', {}, title);
}

function endGroup() {
  issue('endgroup', {}, '');
}

/**
 * Echo TEXT (the output of a child process) so that no line of it can act as a workflow command:
 * between ::stop-commands::TOKEN and ::TOKEN:: the runner only logs. TOKEN is random, so the text
 * cannot end the pause itself.
 */
function echoVerbatim(text) {
  if (!text) return;
  const out = verbatim();
  out.write(text);
  out.end();
}

/** A stream of verbatim text (a child's output as it comes): write(text) as often as needed, then end(). */
function verbatim() {
  const token = crypto.randomUUID();
  let started = false;
  let atLineStart = true;
  return {
    write(text) {
      if (!text) return;
      if (!started) {
        issue('stop-commands', {}, token);
        started = true;
      }
      process.stdout.write(text);
      atLineStart = text.endsWith('\n');
    },
    end() {
      if (!started) return;
      if (!atLineStart) process.stdout.write(os.EOL);
      process.stdout.write(`::${token}::${os.EOL}`);
      started = false;
    },
  };
}

/**
 * One entry of a file command: NAME<<DELIMITER, the value, DELIMITER. The delimiter is random and
 * checked against name and value, so no value can end the entry early and inject another one.
 */
function fileCommandEntry(name, value) {
  const delimiter = `ghadelimiter_${crypto.randomUUID()}`;
  const text = String(value);
  if (name.includes(delimiter) || text.includes(delimiter)) {
    throw new Error(`cannot write ${name}: it contains the delimiter`);
  }
  return `${name}<<${delimiter}${os.EOL}${text}${os.EOL}${delimiter}${os.EOL}`;
}

function appendFileCommand(variable, text) {
  const file = process.env[variable];
  if (!file) {
    // Not under a runner (a local try-out): say what would have been written, minus the value.
    info(`(${variable} is not set: not written)`);
    return;
  }
  fs.appendFileSync(file, text, { encoding: 'utf8' });
}

function setOutput(name, value) {
  appendFileCommand('GITHUB_OUTPUT', fileCommandEntry(name, value));
}

function saveState(name, value) {
  appendFileCommand('GITHUB_STATE', fileCommandEntry(name, value));
}

/** Put DIR in front of PATH for the later steps of the job (and of this process). */
function addPath(dir) {
  appendFileCommand('GITHUB_PATH', `${dir}${os.EOL}`);
  process.env.PATH = `${dir}${require('path').delimiter}${process.env.PATH || ''}`;
}

function appendSummary(markdown) {
  appendFileCommand('GITHUB_STEP_SUMMARY', markdown.endsWith('\n') ? markdown : markdown + os.EOL);
}

module.exports = {
  inputVariable, getInput, getState, escapeData, escapeProperty, formatCommand, fileCommandEntry,
  info, error, warning, notice, mask, startGroup, endGroup, echoVerbatim, verbatim,
  setOutput, saveState, addPath, appendSummary,
};
