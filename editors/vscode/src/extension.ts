// The VS Code side: the language client, the status bar item, the commands and the settings.
import * as vscode from 'vscode';
import {
  CloseAction,
  DidChangeConfigurationNotification,
  ErrorAction,
  ExecuteCommandRequest,
  LanguageClient,
  State,
  type CloseHandlerResult,
  type ErrorHandlerResult,
} from 'vscode-languageclient/node';
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
  type ServerState,
  type ServerStatus,
  type Settings,
} from './logic';

const STATUS = 'lacuna.status';
const COUNT_ACCEPTANCE = 'lacuna.countAcceptance';
const LOADING_POLL_MS = 2000;
const SHUTDOWN_MS = 5000;
const INSTALL_HELP = [
  'Lacuna runs its language server, `lacuna serve`, from a Python environment.',
  'Install it into one (in a clone of the Lacuna repository):',
  '    pip install torch==2.13.0 -e .',
  'Then either select that environment with the Python extension, put its `lacuna` on PATH,',
  'or set the setting lacuna.serverPath to the `lacuna` executable (or to that environment\'s python).',
].join('\n');

function readSettings(): Settings {
  const config = vscode.workspace.getConfiguration('lacuna');
  const read = <K extends keyof Settings>(key: K): Settings[K] => config.get(key, DEFAULT_SETTINGS[key]);
  return {
    enable: read('enable'),
    serverPath: read('serverPath'),
    modelDirectory: read('modelDirectory'),
    device: read('device'),
    engineUrl: read('engineUrl'),
    engineModel: read('engineModel'),
    maxTokens: read('maxTokens'),
    multiline: read('multiline'),
    candidates: read('candidates'),
    enabledLanguages: read('enabledLanguages'),
  };
}

/** The active interpreter of the Python extension (ms-python.python), if it is installed. */
async function activeInterpreter(): Promise<string | undefined> {
  interface PythonApi {
    environments?: {
      getActiveEnvironmentPath(resource?: vscode.Uri): { path: string };
      resolveEnvironment(path: { path: string }): Promise<{ executable: { uri?: vscode.Uri } } | undefined>;
    };
  }
  const python = vscode.extensions.getExtension<PythonApi>('ms-python.python');
  if (!python) {
    return undefined;
  }
  try {
    const environments = (await python.activate()).environments;
    if (!environments) {
      return undefined;
    }
    const active = environments.getActiveEnvironmentPath(vscode.workspace.workspaceFolders?.[0]?.uri);
    return (await environments.resolveEnvironment(active))?.executable.uri?.fsPath;
  } catch {
    return undefined; // an older or broken Python extension: fall back to PATH
  }
}

class Lacuna {
  private readonly output = vscode.window.createOutputChannel('Lacuna', { log: true });
  private readonly item = vscode.window.createStatusBarItem(vscode.StatusBarAlignment.Right, 100);
  private settings = readSettings();
  private client: LanguageClient | undefined;
  private state: ServerState = 'stopped';
  private status: ServerStatus | undefined;
  private pollTimer: ReturnType<typeof setTimeout> | undefined;
  // Start and stop run one after the other, whatever order commands and settings ask for them.
  private queue: Promise<void> = Promise.resolve();

  constructor(context: vscode.ExtensionContext) {
    this.item.command = 'lacuna.toggle';
    this.item.show();
    context.subscriptions.push(
      this.output,
      this.item,
      vscode.commands.registerCommand('lacuna.toggle', () => this.toggle()),
      vscode.commands.registerCommand('lacuna.restart', () => this.restart()),
      vscode.commands.registerCommand('lacuna.showStatus', () => this.showStatus()),
      vscode.commands.registerCommand(COUNT_ACCEPTANCE, (...args: unknown[]) => this.countAcceptance(args)),
      vscode.workspace.onDidChangeConfiguration((event) => {
        if (event.affectsConfiguration('lacuna')) {
          this.settingsChanged();
        }
      }),
    );
    this.render();
  }

  restart(): Promise<void> {
    this.queue = this.queue.then(async () => {
      await this.stop();
      await this.start();
    });
    return this.queue;
  }

  async dispose(): Promise<void> {
    clearTimeout(this.pollTimer);
    await this.stop();
  }

  private async start(): Promise<void> {
    this.settings = readSettings();
    this.status = undefined;
    const interpreter = this.settings.serverPath ? undefined : await activeInterpreter();
    const server = serverCommand(this.settings.serverPath, interpreter, process.env.PATH ?? '');
    if (!server) {
      this.setState('missing');
      const where = this.settings.serverPath
        ? `lacuna.serverPath "${this.settings.serverPath}" does not exist`
        : `no lacuna beside the Python interpreter (${interpreter ?? 'none selected'}) nor on PATH`;
      this.output.error(`cannot find the server: ${where}`);
      void this.offerInstall(where);
      return;
    }
    this.output.info(`starting ${server.command} ${server.args.join(' ')}`);
    const restarts = new RestartBudget();
    let reachedRunning = false; // since the client last (re)started the server
    const client: LanguageClient = new LanguageClient('lacuna', 'Lacuna', server, {
      documentSelector: documentSelector(this.settings.enabledLanguages),
      initializationOptions: serverOptions(this.settings),
      outputChannel: this.output,
      errorHandler: {
        error: (_error, _message, count): ErrorHandlerResult => ({
          action: count !== undefined && count <= 3 ? ErrorAction.Continue : ErrorAction.Shutdown,
        }),
        closed: (): CloseHandlerResult => {
          // A server that dies before it answers `initialize` would die again: say so, no loop.
          const wasRunning = reachedRunning;
          reachedRunning = false;
          if (!wasRunning) {
            this.failed('could not start');
            return { action: CloseAction.DoNotRestart, handled: true };
          }
          if (restarts.take(Date.now())) {
            this.output.warn('the server exited; restarting it');
            this.setState('starting');
            return { action: CloseAction.Restart, handled: true };
          }
          this.failed(`crashed ${restarts.limit + 1} times within ${restarts.windowMs / 60_000} minutes`);
          return { action: CloseAction.DoNotRestart, handled: true };
        },
      },
      middleware: {
        provideInlineCompletionItems: async (document, position, context, token, next) => {
          if (!this.settings.enable) {
            return undefined;
          }
          const result = await next(document, position, context, token);
          this.refreshStatusSoon();
          if (result) {
            redirectAcceptance(Array.isArray(result) ? result : result.items, COUNT_ACCEPTANCE);
          }
          return result;
        },
        // VS Code shows the inline suggestions; the completion list would only repeat them.
        provideCompletionItem: () => undefined,
      },
    });
    client.onDidChangeState(({ newState }) => {
      if (newState === State.Running) {
        reachedRunning = true;
        this.setState('running');
        void this.refreshStatus();
      }
    });
    this.client = client;
    this.setState('starting');
    try {
      await client.start();
    } catch (error) {
      this.output.error(`starting the server: ${error instanceof Error ? error.message : String(error)}`);
      this.failed('could not start');
    }
  }

  private async stop(): Promise<void> {
    const client = this.client;
    this.client = undefined;
    if (client) {
      try {
        // A client that failed to start has nothing to stop; dispose() still releases it. The
        // server needs a second or more to exit (longer while it loads a model): wait, then kill.
        await client.dispose(SHUTDOWN_MS);
      } catch (error) {
        this.output.warn(`stopping the server: ${error instanceof Error ? error.message : String(error)}`);
      }
    }
    this.setState('stopped');
  }

  private settingsChanged(): void {
    const before = this.settings;
    this.settings = readSettings();
    if (startupKey(before) !== startupKey(this.settings)) {
      void this.restart();
    } else if (this.client?.isRunning()) {
      void this.client.sendNotification(DidChangeConfigurationNotification.type, {
        settings: { lacuna: serverOptions(this.settings) },
      });
    }
    this.render();
  }

  private async toggle(): Promise<void> {
    const enable = !this.settings.enable;
    await vscode.workspace.getConfiguration('lacuna').update('enable', enable, vscode.ConfigurationTarget.Global);
    if (!enable) {
      await vscode.commands.executeCommand('editor.action.inlineSuggest.hide');
    }
  }

  private async showStatus(): Promise<void> {
    await this.refreshStatus();
    const choice = await vscode.window.showInformationMessage(
      statusSummary(this.state, this.settings.enable, this.status), 'Show Log');
    if (choice === 'Show Log') {
      this.output.show();
    }
  }

  private async countAcceptance(args: unknown[]): Promise<void> {
    if (this.client?.isRunning()) {
      await this.client.sendRequest(ExecuteCommandRequest.type, { command: 'lacuna.accepted', arguments: args })
        .then(undefined, () => undefined); // a count lost to a restart does not matter
      this.refreshStatusSoon();
    }
  }

  private async refreshStatus(): Promise<void> {
    clearTimeout(this.pollTimer);
    const client = this.client;
    if (client?.isRunning()) {
      try {
        this.status = parseStatus(await client.sendRequest(ExecuteCommandRequest.type, { command: STATUS }));
      } catch (error) {
        this.output.warn(`${STATUS}: ${error instanceof Error ? error.message : String(error)}`);
      }
      if (!this.status?.ready && client === this.client) {
        this.pollTimer = setTimeout(() => void this.refreshStatus(), LOADING_POLL_MS); // the model is loading
      }
    }
    this.render();
  }

  private refreshStatusSoon(): void {
    clearTimeout(this.pollTimer);
    this.pollTimer = setTimeout(() => void this.refreshStatus(), 200);
  }

  private setState(state: ServerState): void {
    this.state = state;
    this.render();
  }

  private render(): void {
    const { text, tooltip } = statusBarText(this.state, this.settings.enable, this.status);
    this.item.text = text;
    this.item.tooltip = tooltip;
  }

  private failed(reason: string): void {
    if (this.state === 'failed') {
      return; // the client reports a failed start twice: the start's error, then the closed connection
    }
    this.setState('failed');
    this.output.error(`the server ${reason}`);
    void vscode.window
      .showErrorMessage(`Lacuna: the language server ${reason}. Its log is in Output → Lacuna.`,
        'Show Log', 'Open Settings', 'Restart')
      .then((choice) => {
        if (choice === 'Show Log') {
          this.output.show();
        } else if (choice === 'Open Settings') {
          void vscode.commands.executeCommand('workbench.action.openSettings', 'lacuna.');
        } else if (choice === 'Restart') {
          void this.restart();
        }
      });
  }

  private async offerInstall(where: string): Promise<void> {
    const choice = await vscode.window.showErrorMessage(
      `Lacuna: cannot find the language server (${where}). Install Lacuna into your Python environment, ` +
        'or set lacuna.serverPath to its `lacuna` executable.',
      'Open Setting', 'How to Install');
    if (choice === 'Open Setting') {
      await vscode.commands.executeCommand('workbench.action.openSettings', 'lacuna.serverPath');
    } else if (choice === 'How to Install') {
      this.output.info(INSTALL_HELP);
      this.output.show();
    }
  }
}

let lacuna: Lacuna | undefined;

export function activate(context: vscode.ExtensionContext): void {
  lacuna = new Lacuna(context);
  void lacuna.restart(); // activation does not wait for the server
}

export function deactivate(): Promise<void> | undefined {
  return lacuna?.dispose();
}
