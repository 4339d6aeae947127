// Drives the listening page in headless Chromium (playwright-core): opens
// the page, takes a suggested prompt, generates a pair, plays both clips,
// rates one, chooses B, and waits for the page to confirm the record.
// Usage: node prefs_e2e.mjs URL CHROMIUM SCREENSHOT
import { chromium } from "playwright-core";

const [url, executablePath, screenshot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath,
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    // Lets the test start playback without a user gesture; a listener
    // presses play.
    "--autoplay-policy=no-user-gesture-required",
  ],
});
try {
  const page = await browser.newPage();
  page.setDefaultTimeout(60_000);
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(url);
  await page.click("#suggest");
  await page.waitForFunction(() => document.querySelector("#prompt").value.length > 0);
  await page.click("#generate");
  await page.waitForSelector("#pair:not([hidden])");
  // The choice is locked until both clips have played.
  if (!(await page.isDisabled("#choose-b"))) throw new Error("choices enabled before listening");
  for (const id of ["#audio-a", "#audio-b"]) {
    await page.$eval(id, (audio) => audio.play());
    await page.waitForFunction((sel) => {
      const a = document.querySelector(sel);
      return a.currentTime > 0 || a.ended;
    }, id);
  }
  await page.waitForFunction(() => !document.querySelector("#choose-b").disabled);
  await page.selectOption("#rating-b", "4");
  await page.click("#choose-b");
  await page.waitForFunction(() => document.querySelector("#status").textContent.includes("Thank you"));
  const status = await page.textContent("#status");
  await page.screenshot({ path: screenshot, fullPage: true });
  if (errors.length) throw new Error("page errors: " + errors.join("; "));
  console.log("page: " + status.trim());
} finally {
  await browser.close();
}
