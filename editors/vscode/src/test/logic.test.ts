import * as assert from 'node:assert/strict';
import * as path from 'node:path';
import { describe, it } from 'node:test';
import {
  DEFAULT_SETTINGS,
  RestartBudget,
  documentSelector,
  parseStatus,
  redirectAcceptance,
  serverCommand,
  serverOptions,
  startupKey,
  statusBarText,
  statusSummary,
  type ServerStatus,
} from '../logic';

const READY: ServerStatus = { model: 'tiny', device: 'cpu', ready: true, engine: 'in-process', lastLatencyMs: 41.6, accepted: 3 };

describe('serverOptions', () => {
  it('maps the defaults to the server defaults', () => {
    assert.deepEqual(serverOptions(DEFAULT_SETTINGS), {
      modelDir: null, device: null, engineUrl: null, maxTokens: 64, multiline: true, candidates: 1, enabledLanguages: ['*'],
    });
  });

  it('passes the values set', () => {
    const settings = {
      ...DEFAULT_SETTINGS, modelDirectory: '/models/dream', device: 'cuda', engineUrl: 'http://127.0.0.1:8000',
      engineModel: 'dream', maxTokens: 128, multiline: false, candidates: 3, enabledLanguages: ['python', 'go'],
    };
    assert.deepEqual(serverOptions(settings), {
      modelDir: '/models/dream', device: 'cuda', engineUrl: 'http://127.0.0.1:8000', engineModel: 'dream',
      maxTokens: 128, multiline: false, candidates: 3, enabledLanguages: ['python', 'go'],
    });
  });

  it('sends nothing the server does not know (it would warn about each), engineModel only when set', () => {
    const known = ['modelDir', 'device', 'engineUrl', 'maxTokens', 'multiline', 'candidates', 'enabledLanguages'];
    assert.deepEqual(Object.keys(serverOptions(DEFAULT_SETTINGS)).sort(), known.sort());
  });
});

describe('startupKey', () => {
  it('changes with what the server reads at start-up only', () => {
    const key = startupKey(DEFAULT_SETTINGS);
    const startup = [{ modelDirectory: '/m' }, { device: 'cpu' }, { serverPath: '/bin/lacuna' }, { engineUrl: 'http://x' },
      { engineModel: 'dream' }, { enabledLanguages: ['rust'] }];
    for (const change of startup) {
      assert.notEqual(startupKey({ ...DEFAULT_SETTINGS, ...change }), key, JSON.stringify(change));
    }
    for (const change of [{ maxTokens: 8 }, { multiline: false }, { candidates: 2 }, { enable: false }]) {
      assert.equal(startupKey({ ...DEFAULT_SETTINGS, ...change }), key, JSON.stringify(change));
    }
  });
});

describe('documentSelector', () => {
  it('selects files and unsaved buffers of every language for *', () => {
    assert.deepEqual(documentSelector(['*']), [{ scheme: 'file' }, { scheme: 'untitled' }]);
  });

  it('selects only the enabled languages', () => {
    assert.deepEqual(documentSelector(['python', 'go']), [
      { scheme: 'file', language: 'python' }, { scheme: 'untitled', language: 'python' },
      { scheme: 'file', language: 'go' }, { scheme: 'untitled', language: 'go' },
    ]);
  });

  it('selects nothing for no languages', () => {
    assert.deepEqual(documentSelector([]), []);
  });
});

describe('serverCommand', () => {
  const bin = path.join('/', 'usr', 'local', 'bin');
  const venv = path.join('/', 'home', 'me', 'venv', 'bin');
  const files = new Set([path.join(bin, 'lacuna'), path.join(venv, 'python3'), path.join(venv, 'lacuna')]);
  const exists = (file: string) => files.has(file);
  const pathEnv = ['/nowhere', bin].join(path.delimiter);

  it('runs a configured lacuna executable', () => {
    assert.deepEqual(serverCommand(path.join(venv, 'lacuna'), undefined, '', exists),
      { command: path.join(venv, 'lacuna'), args: ['serve'] });
  });

  it('runs the module with a configured Python interpreter', () => {
    assert.deepEqual(serverCommand(path.join(venv, 'python3'), undefined, '', exists),
      { command: path.join(venv, 'python3'), args: ['-m', 'lsp.cli', 'serve'] });
  });

  it('looks a bare configured name up on PATH', () => {
    assert.deepEqual(serverCommand('lacuna', undefined, pathEnv, exists), { command: path.join(bin, 'lacuna'), args: ['serve'] });
  });

  it('prefers the lacuna beside the active interpreter to PATH', () => {
    assert.deepEqual(serverCommand('', path.join(venv, 'python3'), pathEnv, exists),
      { command: path.join(venv, 'lacuna'), args: ['serve'] });
  });

  it('falls back to PATH when the interpreter has no lacuna beside it', () => {
    assert.deepEqual(serverCommand('', '/usr/bin/python3', pathEnv, exists), { command: path.join(bin, 'lacuna'), args: ['serve'] });
  });

  it('finds nothing when nothing exists', () => {
    assert.equal(serverCommand('', undefined, pathEnv, () => false), undefined);
    assert.equal(serverCommand('/opt/missing/lacuna', undefined, pathEnv, exists), undefined);
  });
});

describe('parseStatus', () => {
  it('reads the server answer', () => {
    const answer = {
      server: 'lacuna 0.1.0', model: 'tiny', device: 'cpu', ready: true, engine: 'in-process', lastLatencyMs: 41.6,
      accepted: 3, cancelled: 0,
    };
    assert.deepEqual(parseStatus(answer), READY);
  });

  it('tolerates missing and mistyped fields', () => {
    assert.deepEqual(parseStatus({ model: 7, lastLatencyMs: 'soon' }),
      { model: null, device: null, ready: false, engine: null, lastLatencyMs: null, accepted: 0 });
    assert.equal(parseStatus(null), undefined);
    assert.equal(parseStatus('ready'), undefined);
  });
});

describe('statusBarText', () => {
  it('shows the last latency when ready', () => {
    const { text, tooltip } = statusBarText('running', true, READY);
    assert.equal(text, '$(sparkle) Lacuna 42 ms');
    assert.match(tooltip, /Model: tiny on cpu/);
    assert.match(tooltip, /Accepted: 3/);
    assert.match(tooltip, /click to turn them off/);
  });

  it('spins while starting or loading the model', () => {
    assert.equal(statusBarText('starting', true).text, '$(loading~spin) Lacuna');
    assert.equal(statusBarText('running', true, { ...READY, ready: false }).text, '$(loading~spin) Lacuna');
    assert.match(statusBarText('running', true, { ...READY, ready: false }).tooltip, /loading the model/);
  });

  it('shows suggestions turned off', () => {
    const { text, tooltip } = statusBarText('running', false, READY);
    assert.equal(text, '$(circle-slash) Lacuna');
    assert.match(tooltip, /click to turn them on/);
  });

  it('says when the engine service is down', () => {
    assert.match(statusBarText('running', true, { ...READY, ready: false, engine: 'down' }).tooltip, /engine service is down/);
  });

  it('shows a server that failed or is missing as an error', () => {
    assert.equal(statusBarText('failed', true).text, '$(error) Lacuna');
    assert.match(statusBarText('missing', true).tooltip, /lacuna\.serverPath/);
  });

  it('leaves the latency out before the first suggestion', () => {
    assert.equal(statusBarText('running', true, { ...READY, lastLatencyMs: null }).text, '$(sparkle) Lacuna');
  });
});

describe('statusSummary', () => {
  it('puts the state on one line', () => {
    assert.equal(statusSummary('running', true, READY),
      'Lacuna: ready; Model: tiny on cpu; Last suggestion: 42 ms; Accepted: 3; suggestions on');
  });
});

describe('RestartBudget', () => {
  it('allows a few restarts, then none until the window passes', () => {
    const budget = new RestartBudget(3, 1000);
    assert.deepEqual([0, 10, 20, 30].map((now) => budget.take(now)), [true, true, true, false]);
    assert.equal(budget.take(1005), true);
  });
});

describe('redirectAcceptance', () => {
  it('sends the acceptance command to the replacement, leaving others alone', () => {
    const items = [
      { command: { title: 'Lacuna: accepted', command: 'lacuna.accepted', arguments: ['file:///a.py'] } },
      { command: { title: 'other', command: 'other.command' } },
      {},
    ];
    redirectAcceptance(items, 'lacuna.countAcceptance');
    assert.deepEqual(items.map((item) => item.command?.command), ['lacuna.countAcceptance', 'other.command', undefined]);
    assert.deepEqual(items[0].command?.arguments, ['file:///a.py']);
  });
});
