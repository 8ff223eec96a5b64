// Open the study in OHIF, load its SEG (double-click, then "Yes"), keep screenshots.
// usage: node ohif_seg.js VIEWER_URL OUT_DIR   (PLAYWRIGHT_CORE: path of the playwright-core package)
// Prints one JSON line: {"overlay": "<png>", "hydrated": "<png>", "text": "<visible text>"}.
const { chromium } = require(process.env.PLAYWRIGHT_CORE || 'playwright-core');

(async () => {
  const [url, out] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-dev-shm-usage', '--use-angle=swiftshader',
           '--enable-unsafe-swiftshader'],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
    await page.goto(url);
    const seg = page.getByText('SEG', { exact: true }).first();
    await seg.waitFor({ timeout: 90000 });
    await page.waitForTimeout(3000);
    const skip = page.getByText('Skip all');  // the first-visit tour covers the page
    if (await skip.count()) { await skip.first().click(); }
    await seg.dblclick();
    await page.getByText('Do you want to open this Segmentation?').waitFor({ timeout: 90000 });
    await page.waitForTimeout(5000);
    await page.screenshot({ path: `${out}/seg-overlay.png` });
    await page.getByRole('button', { name: 'Yes' }).click();
    await page.waitForTimeout(10000);
    await page.screenshot({ path: `${out}/seg-loaded.png` });
    const text = await page.evaluate(() => document.body.innerText);
    console.log(JSON.stringify({ overlay: `${out}/seg-overlay.png`,
                                 hydrated: `${out}/seg-loaded.png`, text }));
  } finally {
    await browser.close();
  }
})().catch((e) => { console.error(String(e)); process.exit(1); });
