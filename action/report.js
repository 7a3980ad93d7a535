'use strict';
// What the action tells the workflow and the people reading it, from hatun's own JSON (`hatun up
// --json`, `hatun status --json`): step outputs and the job summary. Pure functions; hatun's JSON
// holds no secrets (it redacts), and the summary shows no endpoint either.

/** The outputs of a hatun that is up, from its status document. */
function outputsFromStatus(status) {
  const members = (status.route && status.route.members) || [];
  const tunnels = status.tunnels || [];
  return {
    'tunnels-in-service': String(members.length),
    tunnels: members.join(','),
    healthy: String(tunnels.filter((t) => t.state === 'up').length),
    backend: status.backend || '',
  };
}

/** The outputs when only `hatun up --json` is known (status could not be read). */
function outputsFromUp(up) {
  const healthy = Object.entries((up && up.tunnels) || {}).filter(([, text]) => text === 'healthy').map(([name]) => name);
  return { 'tunnels-in-service': String(healthy.length), tunnels: healthy.join(','), healthy: String(healthy.length), backend: '' };
}

function cell(value) {
  // One table cell: no line breaks, no column separators, no HTML.
  return String(value === null || value === undefined ? '' : value)
    .replace(/[\r\n]+/g, ' ').replace(/\|/g, '\\|').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}

function ms(seconds) {
  return seconds === null || seconds === undefined ? '-' : `${(seconds * 1000).toFixed(1)} ms`;
}

function age(seconds) {
  return seconds === null || seconds === undefined ? 'never' : `${Math.round(seconds)} s ago`;
}

function secs(seconds) {
  return `${seconds.toFixed(1)} s`;
}

/** Markdown for a hatun that came up: a table of its tunnels. */
function upSummary(status, { attempts, upSeconds, installSeconds }) {
  const members = new Set((status.route && status.route.members) || []);
  const tunnels = status.tunnels || [];
  const lines = [
    `### hatun: ${members.size} of ${tunnels.length} tunnels in service`,
    '',
    `Backend ${cell(status.backend || '?')}, prefixes ${cell(((status.route && status.route.prefixes) || []).join(', '))};`
      + ` up after ${attempts} attempt${attempts === 1 ? '' : 's'} in ${secs(upSeconds)}`
      + (installSeconds !== null && installSeconds !== undefined ? ` (installing hatun took ${secs(installSeconds)})` : '') + '.',
    '',
    '| tunnel | state | in route | RTT | loss | last handshake |',
    '|---|---|---|---|---|---|',
  ];
  for (const t of tunnels) {
    lines.push(`| ${cell(t.name)} | ${cell(t.state)} | ${members.has(t.name) ? 'yes' : 'no'} | ${ms(t.rtt_seconds)}`
      + ` | ${cell(((t.loss || 0) * 100).toFixed(0))} % | ${age(t.handshake_age_seconds)} |`);
  }
  return lines.join('\n') + '\n';
}

/** Markdown for a hatun that did not come up: why, per tunnel. */
function failureSummary(message, diagnoses, attempts) {
  const lines = [`### hatun: NOT up (${attempts} attempt${attempts === 1 ? '' : 's'})`, '', cell(message), ''];
  const entries = Object.entries(diagnoses || {});
  if (entries.length) {
    lines.push('| tunnel | diagnosis |', '|---|---|');
    for (const [name, text] of entries) lines.push(`| ${cell(name)} | ${cell(text)} |`);
  }
  return lines.join('\n') + '\n';
}

/** Markdown for the post step: what `hatun down` said it removed. */
function downSummary(ok, text) {
  const lines = text.split('\n').map((l) => l.trim()).filter(Boolean);
  return [`### hatun down: ${ok ? 'done' : 'FAILED'}`, '', ...lines.map((l) => `- ${cell(l)}`)].join('\n') + '\n';
}

module.exports = { outputsFromStatus, outputsFromUp, upSummary, failureSummary, downSummary, cell };
