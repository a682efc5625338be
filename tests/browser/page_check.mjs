// Drives `chitu serve`'s page in headless Chromium over the DevTools protocol (a pipe, so no
// extra package is needed): submits through the form, waits until the finished video has loaded
// in its <video> element, and saves a screenshot.
//
//   node tests/browser/page_check.mjs http://127.0.0.1:PORT SCREENSHOT.png [CHROMIUM]
import { spawn } from "node:child_process";
import { mkdtempSync, writeFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const [url, screenshot, browser = "chromium"] = process.argv.slice(2);
if (!url || !screenshot) {
  console.error("usage: page_check.mjs URL SCREENSHOT.png [CHROMIUM]");
  process.exit(2);
}
const profile = mkdtempSync(join(tmpdir(), "chitu-page-"));
const chrome = spawn(browser, [
  "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
  "--mute-audio", "--autoplay-policy=no-user-gesture-required", "--window-size=1000,1100",
  "--remote-debugging-pipe", `--user-data-dir=${profile}`, "about:blank",
], { stdio: ["ignore", "ignore", "pipe", "pipe", "pipe"] });
let stderr = "";
chrome.stderr.on("data", d => { stderr += d; });

const deadline = setTimeout(() => fail("timed out after 120 s"), 120_000);
// The profile may still be written to as Chromium exits: its removal is best effort.
function cleanUp() {
  try { rmSync(profile, { recursive: true, force: true }); } catch { /* left in the temp dir */ }
}
function fail(why) {
  console.error("page check failed: " + why);
  if (stderr) console.error("chromium said:\n" + stderr.slice(-2000));
  chrome.kill("SIGKILL");
  cleanUp();
  process.exit(1);
}
chrome.on("exit", code => fail("chromium exited (" + code + ")"));

// CDP over the pipe: JSON messages ended by NUL, written to fd 3, read from fd 4.
let nextId = 1, buffer = "";
const pending = new Map();
chrome.stdio[4].on("data", chunk => {
  buffer += chunk.toString("utf8");
  let end;
  while ((end = buffer.indexOf("\0")) >= 0) {
    const msg = JSON.parse(buffer.slice(0, end));
    buffer = buffer.slice(end + 1);
    const waiter = msg.id && pending.get(msg.id);
    if (waiter) {
      pending.delete(msg.id);
      msg.error ? waiter.reject(new Error(msg.error.message)) : waiter.resolve(msg.result);
    }
  }
});
function send(method, params = {}, sessionId) {
  const id = nextId++;
  chrome.stdio[3].write(JSON.stringify({ id, method, params, sessionId }) + "\0");
  return new Promise((resolve, reject) => pending.set(id, { resolve, reject }));
}
const sleep = ms => new Promise(r => setTimeout(r, ms));

try {
  const { targetId } = await send("Target.createTarget", { url: "about:blank" });
  const { sessionId } = await send("Target.attachToTarget", { targetId, flatten: true });
  const page = (method, params) => send(method, params, sessionId);
  const evaluate = async expression => {
    const r = await page("Runtime.evaluate", { expression, returnByValue: true, awaitPromise: true });
    if (r.exceptionDetails) throw new Error(r.exceptionDetails.text + ": " + expression);
    return r.result.value;
  };
  const until = async (what, expression, ms) => {
    const t0 = Date.now();
    for (;;) {
      const v = await evaluate(expression);
      if (v) return v;
      if (Date.now() - t0 > ms) throw new Error("waited " + ms + " ms for " + what);
      await sleep(100);
    }
  };
  await page("Page.enable");
  await page("Page.navigate", { url });
  await until("the form", "document.readyState === 'complete' && !!document.getElementById('form')", 30_000);
  await until("the model line", "document.getElementById('model').textContent.startsWith('Model:')", 30_000);
  // Submit through the form, as a person would.
  await evaluate(`(() => {
    const f = document.getElementById('form');
    f.elements.prompt.value = 'A red fox in the snow';
    f.elements.steps.value = '6';
    f.elements.seed.value = '11';
    document.getElementById('submit').click();
    return true;
  })()`);
  const sawQueue = await until("the job's card", "!!document.querySelector('.job')", 30_000);
  const loaded = await until("the video to load", `(() => {
    const v = document.querySelector('#done video');
    if (!v) return null;
    if (v.error) throw new Error('video error ' + v.error.code + ': ' + v.error.message);
    return v.readyState >= 2 && v.videoWidth > 0 ? { w: v.videoWidth, h: v.videoHeight, t: v.duration } : null;
  })()`, 90_000);
  const error = await evaluate("document.getElementById('error').textContent");
  if (error) throw new Error("the page shows an error: " + error);
  const card = await evaluate("document.querySelector('#done .job').innerText");
  if (!card.includes("succeeded") || !card.includes("Download MP4")) throw new Error("finished card: " + card);
  await sleep(300);
  const shot = await page("Page.captureScreenshot", { format: "png" });
  writeFileSync(screenshot, Buffer.from(shot.data, "base64"));
  console.log(JSON.stringify({ video: loaded, card: sawQueue && card.split("\n")[0], screenshot }));
  clearTimeout(deadline);
  chrome.removeAllListeners("exit");
  const exited = new Promise(r => chrome.once("exit", r));
  send("Browser.close").catch(() => {});
  await Promise.race([exited, sleep(5000)]);
  chrome.kill("SIGKILL");
  cleanUp();
  process.exit(0);
} catch (e) {
  fail(e.message);
}
