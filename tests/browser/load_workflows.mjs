// Load each example workflow into ComfyUI's graph editor in headless Chromium and record what happened.
//
//   node tests/browser/load_workflows.mjs --url http://127.0.0.1:8188 --out /tmp/cl_browser \
//        [--chromium /usr/bin/chromium] example_workflows/a.json example_workflows/b.json ...
//
// For every workflow: app.loadGraphData(workflow) as the "Open" menu does, then
//   * node types the frontend does not know (LiteGraph.registered_node_types) and any dialog left open
//     (the missing-nodes dialog is a PrimeVue dialog),
//   * console errors and page errors raised while it loads and converts,
//   * app.graphToPrompt().output  -> <out>/<name>.api.json   (what Queue would send: compared with our converter)
//   * a screenshot of the graph fitted to the window -> <out>/<name>.png
// Everything is summarised in <out>/results.json. Exit code 0 even when a workflow has problems: the pytest
// wrapper (test_browser_workflows.py) reads results.json and asserts.
import { chromium } from 'playwright-core'
import fs from 'node:fs'
import path from 'node:path'

function parseArgs(argv) {
  const a = { url: 'http://127.0.0.1:8188', out: 'browser_out', chromium: '/usr/bin/chromium', files: [] }
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i]
    if (k === '--url') a.url = argv[++i]
    else if (k === '--out') a.out = argv[++i]
    else if (k === '--chromium') a.chromium = argv[++i]
    else a.files.push(k)
  }
  return a
}

const args = parseArgs(process.argv.slice(2))
fs.mkdirSync(args.out, { recursive: true })
const userDir = fs.mkdtempSync(path.join(args.out, 'profile-'))

// an empty profile directory (playwright passes it as --user-data-dir)
const browser = await chromium.launchPersistentContext(userDir, {
  executablePath: args.chromium,
  headless: true,
  viewport: { width: 1920, height: 1200 },
  args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync']
})
const page = browser.pages()[0] ?? await browser.newPage()
let events = []
page.on('console', (m) => { if (m.type() === 'error') events.push({ kind: 'console', text: m.text() }) })
page.on('pageerror', (e) => events.push({ kind: 'pageerror', text: String(e) }))
// name the resource behind a 'Failed to load resource' console line
page.on('response', (r) => { if (r.status() >= 400) events.push({ kind: 'http', text: `${r.status()} ${r.url()}` }) })

const results = { url: args.url, startup_errors: [], workflows: [] }
const t0 = Date.now()
await page.goto(args.url, { waitUntil: 'domcontentloaded', timeout: 120000 })
await page.waitForFunction(() => window.app && window.app.graph && window.app.canvas &&
  window.LiteGraph && Object.keys(window.LiteGraph.registered_node_types).length > 100, null, { timeout: 120000 })
await page.waitForTimeout(1500)
// close whatever the first start shows (templates browser, release notes) so it is not mistaken for a
// missing-node dialog
await page.keyboard.press('Escape')
await page.waitForTimeout(300)
// no minimap in the screenshots (a setting of frontend 1.27; ignored where it does not exist)
await page.evaluate(async () => {
  try { await window.app.extensionManager.setting.set('Comfy.Minimap.Visible', false) } catch (e) {}
  // draw text and widgets even when zoomed out (thumbnails of big graphs)
  try { await window.app.extensionManager.setting.set('LiteGraph.Canvas.LowQualityRenderingZoomThreshold', 0.1) } catch (e) {}
  // frontend 1.27 derives the threshold from the minimum font size for level of detail: 0 = always full quality
  try { await window.app.extensionManager.setting.set('LiteGraph.Canvas.MinFontSizeForLOD', 0) } catch (e) {}
  if ('_min_font_size_for_lod' in window.app.canvas) window.app.canvas._min_font_size_for_lod = 0
  if ('_lowQualityZoomThreshold' in window.app.canvas) window.app.canvas._lowQualityZoomThreshold = 0
})
results.startup_ms = Date.now() - t0
results.startup_errors = events
results.frontend_version = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? null)

for (const file of args.files) {
  const name = path.basename(file, '.json')
  const wf = JSON.parse(fs.readFileSync(file, 'utf8'))
  events = []
  const t = Date.now()
  const res = await page.evaluate(async ({ wf, name }) => {
    const known = window.LiteGraph.registered_node_types
    const missing = wf.nodes.map((n) => n.type).filter((t) => !(t in known))
    await window.app.loadGraphData(wf, true, true, name)
    const graph = window.app.graph
    const loaded = graph._nodes.map((n) => ({ id: n.id, type: n.type, has_errors: !!n.has_errors }))
    // fit the whole graph into the window for the screenshot
    const b = [Infinity, Infinity, -Infinity, -Infinity]
    for (const n of graph._nodes) {
      b[0] = Math.min(b[0], n.pos[0]); b[1] = Math.min(b[1], n.pos[1] - 30)
      b[2] = Math.max(b[2], n.pos[0] + n.size[0]); b[3] = Math.max(b[3], n.pos[1] + n.size[1])
    }
    const canvas = window.app.canvas
    const el = canvas.canvas
    const w = el.clientWidth || el.width, h = el.clientHeight || el.height
    const scale = Math.min(1.1, 0.92 * Math.min(w / (b[2] - b[0]), h / (b[3] - b[1])))
    canvas.ds.scale = scale
    canvas.ds.offset[0] = (w / scale - (b[2] - b[0])) / 2 - b[0]
    canvas.ds.offset[1] = (h / scale - (b[3] - b[1])) / 2 - b[1]
    canvas.setDirty(true, true)
    const p = await window.app.graphToPrompt()
    return { missing, loaded, output: p.output }
  }, { wf, name })
  await page.waitForTimeout(700)
  // dialogs open after loading (missing nodes / models warnings)
  const dialogs = await page.$$eval('.p-dialog', (ds) => ds.filter((d) => d.offsetParent !== null)
    .map((d) => d.innerText.slice(0, 400)))
  const shot = path.join(args.out, `${name}.png`)
  await page.screenshot({ path: shot })
  fs.writeFileSync(path.join(args.out, `${name}.api.json`), JSON.stringify(res.output, null, 2))
  results.workflows.push({
    name, file, ms: Date.now() - t, missing: res.missing, dialogs, errors: events,
    nodes: res.loaded.length, nodes_with_errors: res.loaded.filter((n) => n.has_errors).map((n) => n.type),
    screenshot: shot, api: path.join(args.out, `${name}.api.json`)
  })
  await page.keyboard.press('Escape')
}

await browser.close()
fs.rmSync(userDir, { recursive: true, force: true })
fs.writeFileSync(path.join(args.out, 'results.json'), JSON.stringify(results, null, 2))
console.log(JSON.stringify(results.workflows.map((w) => ({
  name: w.name, ms: w.ms, missing: w.missing, dialogs: w.dialogs.length, errors: w.errors.length
}))))
