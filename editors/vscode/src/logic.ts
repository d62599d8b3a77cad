// The extension's pure logic: no `vscode` import, so the unit tests run in plain node.
import * as fs from 'node:fs';
import * as path from 'node:path';

/** The `lacuna.*` settings as VS Code holds them. */
export interface Settings {
  enable: boolean;
  serverPath: string;
  modelDirectory: string;
  device: string;
  engineUrl: string;
  engineModel: string;
  maxTokens: number;
  multiline: boolean;
  candidates: number;
  enabledLanguages: string[];
}

export const DEFAULT_SETTINGS: Settings = {
  enable: true,
  serverPath: '',
  modelDirectory: '',
  device: 'auto',
  engineUrl: '',
  engineModel: '',
  maxTokens: 64,
  multiline: true,
  candidates: 1,
  enabledLanguages: ['*'],
};

/** The server's camelCase options (lsp/config.py) for `initializationOptions` and
 * `workspace/didChangeConfiguration`; null leaves the server's own default. */
export function serverOptions(settings: Settings): Record<string, unknown> {
  return {
    modelDir: settings.modelDirectory || null,
    device: settings.device === 'auto' ? null : settings.device,
    engineUrl: settings.engineUrl || null,
    // Sent only when set: a server older than this option would warn about an unknown setting.
    ...(settings.engineModel ? { engineModel: settings.engineModel } : {}),
    maxTokens: settings.maxTokens,
    multiline: settings.multiline,
    candidates: settings.candidates,
    enabledLanguages: settings.enabledLanguages,
  };
}

/** The settings the server reads only at start-up (or, for the languages, the client at
 * registration): a change to any of them restarts the server. */
export function startupKey(settings: Settings): string {
  const { serverPath, modelDirectory, device, engineUrl, engineModel, enabledLanguages } = settings;
  return JSON.stringify([serverPath, modelDirectory, device, engineUrl, engineModel, enabledLanguages]);
}

export interface DocumentFilter {
  scheme: string;
  language?: string;
}

/** Which documents the client sends to the server: files and unsaved buffers of the enabled
 * languages, so others cost nothing (no didOpen, no requests). */
export function documentSelector(languages: string[]): DocumentFilter[] {
  const schemes = ['file', 'untitled'];
  if (languages.includes('*')) {
    return schemes.map((scheme) => ({ scheme }));
  }
  return languages.flatMap((language) => schemes.map((scheme) => ({ scheme, language })));
}

export interface ServerCommand {
  command: string;
  args: string[];
}

const PYTHON = /^python(\d+(\.\d+)?)?(\.exe)?$/i;
const LACUNA = process.platform === 'win32' ? ['lacuna.exe', path.join('Scripts', 'lacuna.exe')] : ['lacuna'];

function serve(executable: string): ServerCommand {
  return PYTHON.test(path.basename(executable))
    ? { command: executable, args: ['-m', 'lsp.cli', 'serve'] }
    : { command: executable, args: ['serve'] };
}

function onPath(name: string, pathEnv: string, exists: (file: string) => boolean): string | undefined {
  return pathEnv.split(path.delimiter).filter(Boolean).map((dir) => path.join(dir, name)).find(exists);
}

/** How to start `lacuna serve`: the configured path (a `lacuna` executable or a Python
 * interpreter), else the `lacuna` beside the active Python interpreter, else the one on PATH;
 * undefined when none exists. */
export function serverCommand(
  serverPath: string,
  interpreter: string | undefined,
  pathEnv: string,
  exists: (file: string) => boolean = isFile,
): ServerCommand | undefined {
  if (serverPath) {
    const bare = !serverPath.includes('/') && !serverPath.includes('\\');
    const found = bare ? onPath(serverPath, pathEnv, exists) : exists(serverPath) ? serverPath : undefined;
    return found ? serve(found) : undefined;
  }
  if (interpreter) {
    const beside = LACUNA.map((name) => path.join(path.dirname(interpreter), name)).find(exists);
    if (beside) {
      return serve(beside);
    }
  }
  const found = onPath(LACUNA[0], pathEnv, exists);
  return found ? serve(found) : undefined;
}

function isFile(file: string): boolean {
  try {
    return fs.statSync(file).isFile();
  } catch {
    return false;
  }
}

/** The answer of the server's `lacuna.status` command (lsp/server.py). */
export interface ServerStatus {
  model: string | null;
  device: string | null;
  ready: boolean;
  engine: string | null; // "in-process", or "up" / "down" for an engine service
  lastLatencyMs: number | null;
  accepted: number;
}

/** A status answer checked field by field: a server of another version may differ. */
export function parseStatus(answer: unknown): ServerStatus | undefined {
  if (typeof answer !== 'object' || answer === null) {
    return undefined;
  }
  const fields = answer as Record<string, unknown>;
  const text = (value: unknown) => (typeof value === 'string' ? value : null);
  const number = (value: unknown) => (typeof value === 'number' && Number.isFinite(value) ? value : null);
  return {
    model: text(fields.model),
    device: text(fields.device),
    ready: fields.ready === true,
    engine: text(fields.engine),
    lastLatencyMs: number(fields.lastLatencyMs),
    accepted: number(fields.accepted) ?? 0,
  };
}

/** Where the extension's server stands. */
export type ServerState = 'starting' | 'running' | 'failed' | 'missing' | 'stopped';

export interface StatusBarText {
  text: string;
  tooltip: string;
}

/** The status bar item: an icon for the state, the last latency once there is one. */
export function statusBarText(state: ServerState, enabled: boolean, status?: ServerStatus): StatusBarText {
  const loading = state === 'starting' || (state === 'running' && !status?.ready);
  let text: string;
  if (state === 'failed' || state === 'missing' || state === 'stopped') {
    text = '$(error) Lacuna';
  } else if (!enabled) {
    text = '$(circle-slash) Lacuna';
  } else if (loading) {
    text = '$(loading~spin) Lacuna';
  } else {
    const latency = status?.lastLatencyMs;
    text = latency == null ? '$(sparkle) Lacuna' : `$(sparkle) Lacuna ${Math.round(latency)} ms`;
  }
  const lines = [`Lacuna: ${describeState(state, status)}`];
  if (state === 'running' && status) {
    lines.push(...statusLines(status));
  }
  lines.push(enabled ? 'Suggestions on: click to turn them off' : 'Suggestions off: click to turn them on');
  return { text, tooltip: lines.join('\n') };
}

function describeState(state: ServerState, status?: ServerStatus): string {
  switch (state) {
    case 'starting':
      return 'starting the server';
    case 'running':
      if (status?.engine === 'down') {
        return 'the engine service is down';
      }
      return status?.ready ? 'ready' : 'loading the model';
    case 'failed':
      return 'the server stopped (see Output → Lacuna)';
    case 'missing':
      return 'the lacuna server was not found (see the setting lacuna.serverPath)';
    case 'stopped':
      return 'stopped';
  }
}

function statusLines(status: ServerStatus): string[] {
  const lines = [];
  if (status.model) {
    lines.push(`Model: ${status.model}${status.device ? ` on ${status.device}` : ''}`);
  }
  if (status.lastLatencyMs != null) {
    lines.push(`Last suggestion: ${Math.round(status.lastLatencyMs)} ms`);
  }
  lines.push(`Accepted: ${status.accepted}`);
  return lines;
}

/** One line for `Lacuna: Show Status`. */
export function statusSummary(state: ServerState, enabled: boolean, status?: ServerStatus): string {
  const parts = [describeState(state, status)];
  if (state === 'running' && status) {
    parts.push(...statusLines(status));
  }
  parts.push(enabled ? 'suggestions on' : 'suggestions off');
  return `Lacuna: ${parts.join('; ')}`;
}

/** Crash restarts allowed: `limit` within `windowMs`, then the server stays stopped. */
export class RestartBudget {
  private times: number[] = [];

  constructor(
    readonly limit = 3,
    readonly windowMs = 3 * 60_000,
  ) {}

  take(now: number): boolean {
    this.times = this.times.filter((time) => now - time < this.windowMs);
    if (this.times.length >= this.limit) {
      return false;
    }
    this.times.push(now);
    return true;
  }
}

/** The command the server attaches to each suggestion, counting acceptances. */
export const ACCEPTED = 'lacuna.accepted';

/** Items whose acceptance command goes to `replacement` instead: the client registers the
 * server's commands only while the server runs, and a suggestion accepted during a restart
 * would otherwise fail with "command not found". */
export function redirectAcceptance<T extends { command?: { command: string } }>(items: T[], replacement: string): T[] {
  for (const item of items) {
    if (item.command?.command === ACCEPTED) {
      item.command = { ...item.command, command: replacement };
    }
  }
  return items;
}
