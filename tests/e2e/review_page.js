// A reviewer in headless Chromium: log in, open the annotation, look at its previews, approve
// it with a signature. usage: node review_page.js BASE_URL ANNOTATION_ID OUT_DIR
// env: PLAYWRIGHT_CORE (the playwright-core package), CHROMIUM, REVIEW_USER, REVIEW_PASSPHRASE.
// Prints one JSON line: {"previews": n, "loaded": n, "signed": "<text>", "state": "<state>"}.
const { chromium } = require(process.env.PLAYWRIGHT_CORE || 'playwright-core');

(async () => {
  const [base, id, out] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-dev-shm-usage'],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1300, height: 1000 } });
    await page.goto(`${base}/review`);  // no session yet: sent to the login form
    await page.fill('input[name=user_id]', process.env.REVIEW_USER);
    await page.fill('input[name=passphrase]', process.env.REVIEW_PASSPHRASE);
    await Promise.all([page.waitForURL(`${base}/review`), page.click('#login button')]);
    await page.screenshot({ path: `${out}/review-list.png`, fullPage: true });
    await Promise.all([page.waitForLoadState(), page.click(`a[href="/review/annotations/${id}"]`)]);
    await page.waitForFunction(() => [...document.images].every((i) => i.complete));
    const previews = await page.locator('.previews img').count();
    const loaded = await page.evaluate(
      () => [...document.querySelectorAll('.previews img')].filter((i) => i.naturalWidth > 0).length);
    await page.screenshot({ path: `${out}/review-annotation.png`, fullPage: true });
    await page.fill('#decide input[name=passphrase]', process.env.REVIEW_PASSPHRASE);
    await page.fill('#decide input[name=meaning]', 'reviewed and approved');
    await Promise.all([page.waitForSelector('#signed'),
                       page.click('#decide button[value=approve]')]);
    await page.waitForFunction(() => [...document.images].every((i) => i.complete));
    await page.screenshot({ path: `${out}/review-signed.png`, fullPage: true });
    console.log(JSON.stringify({
      previews, loaded, signed: await page.locator('#signed').innerText(),
      state: await page.locator('#state').innerText(),
    }));
  } finally {
    await browser.close();
  }
})().catch((e) => { console.error(String(e)); process.exit(1); });
