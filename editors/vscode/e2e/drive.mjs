// Drives VS Code (code-server) in Debian's Chromium: opens a Python file, types, waits for
// Lacuna's ghost text, screenshots it, accepts it with Tab and checks the saved file; then
// accepts a suggestion while the server restarts, turns suggestions off and on from the status
// bar, and starts a server that crashes at once.
// Usage: node drive.mjs URL WORK SCREENSHOT, WORK holding workspace/area.py, code-server's data/
// and the server wrapper that exits at once when WORK/crash exists (see run.sh);
// E2E_MODULES: the node_modules with playwright-core.
import { readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { createRequire } from 'node:module';

const { chromium } = createRequire(`${process.env.E2E_MODULES}/`)('playwright-core');
const [url, work, screenshot] = process.argv.slice(2);
const file = join(work, 'workspace', 'area.py');
const started = Date.now();
const log = (message) => console.log(`[${((Date.now() - started) / 1000).toFixed(1)} s] ${message}`);

async function waitFor(check, what, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) {
      return value;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs / 1000} s waiting for ${what}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
}

const savedLine = () => readFileSync(file, 'utf8').split('\n')[1];

/** The extension's output channel, as VS Code writes it to the logs. */
function extensionLog() {
  const logs = join(work, 'data', 'logs');
  const name = readdirSync(logs, { recursive: true }).find((path) => path.endsWith('Lacuna.log'));
  return readFileSync(join(logs, name), 'utf8');
}

const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--no-first-run'],
});
const page = await browser.newPage({ viewport: { width: 1100, height: 520 } });
try {
  await page.goto(url);
  await page.locator('.monaco-workbench').waitFor({ timeout: 90_000 });
  log('workbench loaded');

  await page.keyboard.press('Control+P');
  await page.keyboard.type('area.py');
  await page.locator('.quick-input-list .monaco-list-row').first().waitFor();
  await page.keyboard.press('Enter');
  const editor = page.locator('.editor-instance .monaco-editor').first();
  const line2 = editor.locator('.view-line', { hasText: 'result =' }).first();
  await line2.waitFor();
  log('area.py open');

  // The status bar item shows a sparkle once the server has loaded the model: typing before
  // that would ask a provider that is not there yet, and VS Code asks again only on the next edit.
  const statusItem = page.locator('.statusbar-item', { hasText: 'Lacuna' }).first();
  await statusItem.locator('.codicon-sparkle').waitFor({ timeout: 120_000 });
  log('server ready');

  // Line 2 is "    result = ": go to its end and type, as a user would.
  await line2.click();
  await page.keyboard.press('End');
  await page.keyboard.type('w');
  const ghost = editor.locator('.ghost-text-decoration, .ghost-text');
  const typed = Date.now();
  const shown = await waitFor(async () => (await ghost.count()) && ghost.first().textContent(), 'the ghost text', 30_000);
  log(`ghost text "${shown}" after ${((Date.now() - typed) / 1000).toFixed(1)} s`);
  await waitFor(async () => /Lacuna \d+ ms/.test(await statusItem.textContent()), 'the latency in the status bar', 10_000);
  log(`status bar: "${(await statusItem.textContent()).trim()}"`);
  await page.screenshot({ path: screenshot });

  await page.keyboard.press('Tab');
  await page.keyboard.press('Control+S');
  await waitFor(() => /^ {4}result = wx+$/.test(savedLine()), 'the accepted suggestion in the saved file', 10_000);
  log(`accepted with Tab; line 2 of the saved file: ${JSON.stringify(savedLine())}`);

  // A suggestion accepted while the server restarts (`Lacuna: Restart Server` from a key
  // binding, so the editor keeps its focus and the ghost text): no error.
  await page.keyboard.press('Home');
  await page.keyboard.press('Shift+End');
  await page.keyboard.type('result = v');
  await waitFor(async () => (await ghost.count()) && ghost.first().textContent(), 'the second ghost text', 30_000);
  await page.keyboard.press('Control+Alt+R');
  await statusItem.locator('.codicon-loading').waitFor({ timeout: 10_000 });
  if (!(await ghost.count())) {
    throw new Error('the ghost text went away when the server restarted');
  }
  await page.keyboard.press('Tab');
  await page.keyboard.press('Control+S');
  await waitFor(() => /^ {4}result = vx+$/.test(savedLine()), 'the suggestion accepted during the restart', 10_000);
  await statusItem.locator('.codicon-sparkle').waitFor({ timeout: 120_000 });
  const errors = page.locator('.notifications-toasts .notification-toast', { has: page.locator('.codicon-error') });
  if (await errors.count()) {
    throw new Error(`error notification: ${await errors.first().textContent()}`);
  }
  log('accepted a suggestion while the server restarted; the new server is ready, no error shown');

  // A click on the status bar item turns suggestions off: typing then shows none.
  await statusItem.click();
  await statusItem.locator('.codicon-circle-slash').waitFor({ timeout: 10_000 });
  await page.keyboard.press('Home');
  await page.keyboard.press('Shift+End');
  await page.keyboard.type('result = u');
  await page.waitForTimeout(3000);
  if (await ghost.count()) {
    throw new Error('a suggestion was shown while suggestions were off');
  }
  await statusItem.click();
  await statusItem.locator('.codicon-sparkle').waitFor({ timeout: 10_000 });
  log('the status bar item turned suggestions off (none shown while typing) and on again');

  // A server that exits at once: one clear message, no restart loop.
  writeFileSync(join(work, 'crash'), '');
  await page.keyboard.press('Control+Alt+R');
  const crashed = page.locator('.notifications-toasts .notification-toast', { hasText: 'could not start' });
  await crashed.first().waitFor({ timeout: 60_000 });
  await page.waitForTimeout(5000);
  // The server's stderr reaches the output channel: one line per start of the crashing server.
  const starts = extensionLog().match(/exiting on purpose/g)?.length ?? 0;
  if ((await crashed.count()) !== 1 || starts !== 1 || !(await statusItem.locator('.codicon-error').count())) {
    throw new Error(`after a crash at start: ${await crashed.count()} messages, ${starts} starts`);
  }
  const message = (await crashed.first().locator('.notification-list-item-message').textContent()).trim();
  log(`crash at start: "${message}"; started once, its stderr in Output → Lacuna`);
  log('PASS');
} catch (error) {
  await page.screenshot({ path: screenshot.replace(/\.png$/, '-failure.png') });
  throw error;
} finally {
  await browser.close();
}
