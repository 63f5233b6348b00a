// The browser-test harness: starts the real gateway binary and its mock upstream on loopback,
// launches Debian's Chromium through playwright-core, and drives the demo page's shim in many
// tabs of ONE browser context. It builds nothing: the binary comes from $MUXGATE_BIN
// (default ../target/debug/muxgate relative to web/).
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import fs from 'node:fs'
import net from 'node:net'
import os from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import { chromium } from 'playwright-core'

const here = path.dirname(fileURLToPath(import.meta.url))
export const WEB_DIR = path.resolve(here, '..')
export const BIN = path.resolve(WEB_DIR, process.env.MUXGATE_BIN ?? '../target/debug/muxgate')
export const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium'
export const ADMIN_TOKEN = 'e2e-admin-token'
const JWT_SECRET = 'e2e-secret-0123456789abcdef0123456789'

const WORDS = ['alpha', 'bravo', 'charlie', 'delta', 'echo', 'foxtrot', 'golf', 'hotel', 'india',
  'juliet', 'kilo', 'lima', 'mike', 'november', 'oscar', 'papa']

/**
 * The exact answer the mock streams in word mode: chunk k is WORDS[(h + k) % 16] + k + ' ',
 * h the sum of the UTF-8 bytes of the prompt without its [[mock ...]] block, trimmed.
 */
export function expectedText (prompt, chunks) {
  const cleaned = prompt.replace(/\[\[mock[^\]]*\]\]/g, '').trim()
  const h = [...Buffer.from(cleaned, 'utf8')].reduce((a, b) => a + b, 0)
  let out = ''
  for (let k = 0; k < chunks; k++) out += `${WORDS[(h + k) % 16]}${k} `
  return out
}

/** A prompt asking the mock for `chunks` chunks, `delayMs` apart, after `stallMs`. */
export function mockPrompt (tag, { chunks, delayMs, stallMs = 0 }) {
  return `${tag} [[mock chunks=${chunks} delay_ms=${delayMs} stall_ms=${stallMs}]]`
}

export const sleep = ms => new Promise(r => setTimeout(r, ms))

/** Polls `fn` until truthy; throws with `what` after `timeoutMs`. */
export async function waitFor (fn, { timeoutMs = 20_000, stepMs = 100, what = 'condition' } = {}) {
  const end = Date.now() + timeoutMs
  let last
  for (;;) {
    try {
      last = await fn()
      if (last) return last
    } catch (err) {
      last = err
    }
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what} (last: ${last instanceof Error ? last.message : JSON.stringify(last)})`)
    await sleep(stepMs)
  }
}

/** A loopback port nobody listens on right now. */
export function freePort () {
  return new Promise((resolve, reject) => {
    const srv = net.createServer()
    srv.unref()
    srv.on('error', reject)
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address()
      srv.close(() => resolve(port))
    })
  })
}

// Every child still running when node exits, with the signal that ends it: SIGKILL, except
// nginx's master, which must be asked (SIGTERM) so that it stops its workers too.
const children = new Map()
process.on('exit', () => { for (const [c, signal] of children) try { c.kill(signal) } catch {} })

/** Spawns `BIN args`, resolves once stdout prints a line matching `ready`. */
function startProcess (args, env, ready, { timeoutMs = 15_000 } = {}) {
  if (!fs.existsSync(BIN)) {
    throw new Error(`gateway binary not found at ${BIN}: build it (cargo build) or set MUXGATE_BIN`)
  }
  const proc = spawn(BIN, args, { env: { ...process.env, MUXGATE_LOG: process.env.MUXGATE_LOG ?? 'warn', ...env }, stdio: ['ignore', 'pipe', 'pipe'] })
  children.set(proc, 'SIGKILL')
  let stderr = ''
  proc.stderr.on('data', d => { stderr = (stderr + d).slice(-8000) })
  const exited = new Promise(resolve => proc.on('exit', (code, signal) => { children.delete(proc); resolve({ code, signal }) }))
  return new Promise((resolve, reject) => {
    let out = ''
    const timer = setTimeout(() => {
      proc.kill('SIGKILL')
      reject(new Error(`${args[0] ?? 'serve'} did not start in ${timeoutMs} ms\n${stderr}`))
    }, timeoutMs)
    proc.stdout.on('data', (d) => {
      out += d
      const m = ready.exec(out)
      if (m) {
        clearTimeout(timer)
        resolve({ proc, exited, url: m[1], stderr: () => stderr })
      }
    })
    exited.then(({ code, signal }) => {
      clearTimeout(timer)
      reject(new Error(`${args[0] ?? 'serve'} exited early (${code ?? signal})\n${stderr}`))
    })
  })
}

async function stopProcess (p, signal = 'SIGTERM', timeoutMs = 15_000) {
  if (!p || p.proc.exitCode !== null || p.proc.signalCode !== null) return
  p.proc.kill(signal)
  const t = setTimeout(() => p.proc.kill('SIGKILL'), timeoutMs)
  await p.exited
  clearTimeout(t)
}

/** The mock upstream on a free loopback port. */
export async function startMock () {
  const p = await startProcess(['mock-upstream', '--listen', '127.0.0.1:0'], {}, /mock-upstream: listening on (http:\/\/\S+)/)
  const url = p.url
  return {
    url,
    async stats () {
      const res = await fetch(`${url}/mock/stats`)
      return res.json()
    },
    async reset () {
      await fetch(`${url}/mock/reset`, { method: 'POST' })
    },
    stop: () => stopProcess(p, 'SIGKILL'),
  }
}

/**
 * The gateway on `port` (the same port again after a restart), relaying to `mockUrl`, in dev
 * mode with a fixed JWT secret (so tokens outlive a restart) and a short drain. `staticDir`
 * (default web/) is what it serves at `/`: the measurement script points it at a copy of an
 * older shim to compare. `config` is TOML added to the gateway's config file (tiers, limits).
 */
export async function startGateway ({ port, mockUrl, drainMs = 2000, staticDir = WEB_DIR, config: extra = '', env = {} }) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'muxgate-e2e-'))
  const config = path.join(dir, 'muxgate.toml')
  fs.writeFileSync(config, `drain_timeout_ms = ${drainMs}\n${extra}`)
  const p = await startProcess(['serve'], {
    MUXGATE_CONFIG: config,
    MUXGATE_LISTEN: `127.0.0.1:${port}`,
    MUXGATE_UPSTREAM_BASE_URL: `${mockUrl}/v1`,
    MUXGATE_ADMIN_TOKEN: ADMIN_TOKEN,
    MUXGATE_DEV: 'true',
    MUXGATE_JWT_SECRET: JWT_SECRET,
    MUXGATE_STATIC_DIR: staticDir,
    ...env,
  }, /muxgate: listening on (http:\/\/\S+)/)
  return {
    url: p.url,
    port,
    proc: p.proc,
    exited: p.exited,
    stderr: p.stderr,
    /** `{user, connections, connections_total, live_streams}` */
    async admin (user) {
      const res = await fetch(`${p.url}/admin/users/${encodeURIComponent(user)}`, { headers: { authorization: `Bearer ${ADMIN_TOKEN}` } })
      if (!res.ok) throw new Error(`admin answered ${res.status}`)
      return res.json()
    },
    stop: (signal = 'SIGTERM') => stopProcess(p, signal),
  }
}

/**
 * Gateway config (startStack's `config`): the free tier allows 2 requests a minute per user,
 * for the rate-limit tests; the other tiers keep their defaults (a [tiers] table replaces the
 * default one whole).
 */
export const TIERS_FREE_AT_2_RPM = `
[tiers.free]
priority = 0
user_rpm = 2
rpm = 60
tpm = 50000
on_limit = "reject"
max_wait_ms = 0

[tiers.pro]
priority = 1
user_rpm = 120
rpm = 500
tpm = 500000
on_limit = "wait"
max_wait_ms = 5000

[tiers.enterprise]
priority = 2
user_rpm = 600
rpm = 5000
tpm = 5000000
on_limit = "wait"
max_wait_ms = 5000
`

/**
 * Mock + gateway; `restartGateway()` brings the gateway back on the same port. With
 * `cluster: true`, see startCluster instead.
 */
export async function startStack ({ staticDir, config, cluster = false } = {}) {
  if (cluster) return startCluster({ staticDir, config })
  const mock = await startMock()
  const port = await freePort()
  const stack = { mock, gateway: await startGateway({ port, mockUrl: mock.url, staticDir, config }) }
  stack.restartGateway = async (signal = 'SIGTERM') => {
    await stack.gateway.stop(signal)
    stack.gateway = await startGateway({ port, mockUrl: mock.url, staticDir, config })
    return stack.gateway
  }
  stack.stop = async () => {
    await stack.gateway.stop('SIGKILL')
    await mock.stop()
  }
  return stack
}

/**
 * Spawns a helper server (redis-server, nginx) and resolves once `port` accepts connections.
 * `stopSignal` is what ends it; `install` names the Debian package to install when missing.
 */
async function startDaemon (bin, args, { port, stopSignal, install, timeoutMs = 10_000 }) {
  const proc = spawn(bin, args, { stdio: ['ignore', 'ignore', 'pipe'] })
  let stderr = ''
  proc.stderr.on('data', d => { stderr = (stderr + d).slice(-4000) })
  const exited = new Promise(resolve => proc.on('exit', (code, signal) => { children.delete(proc); resolve({ code, signal }) }))
  const failed = new Promise((resolve, reject) => {
    proc.on('error', err => reject(err.code === 'ENOENT'
      ? new Error(`${bin} is missing: install Debian's \`${install}\` package (apt-get install ${install})`)
      : err))
    exited.then(({ code, signal }) => reject(new Error(`${bin} exited early (${code ?? signal})\n${stderr}`)))
  })
  failed.catch(() => {})
  children.set(proc, stopSignal)
  const connects = () => new Promise(resolve => {
    const s = net.connect(port, '127.0.0.1', () => { s.destroy(); resolve(true) })
    s.on('error', () => resolve(false))
  })
  const end = Date.now() + timeoutMs
  while (!(await Promise.race([connects(), failed]))) {
    if (Date.now() > end) { proc.kill('SIGKILL'); throw new Error(`${bin} did not listen on ${port} in ${timeoutMs} ms\n${stderr}`) }
    await sleep(50)
  }
  return {
    async stop () {
      if (proc.exitCode !== null || proc.signalCode !== null) return
      proc.kill(stopSignal)
      const t = setTimeout(() => proc.kill('SIGKILL'), 10_000)
      await exited
      clearTimeout(t)
    },
  }
}

/** A redis-server on a free loopback port, with no persistence, in a temporary directory. */
export async function startRedis () {
  const port = await freePort()
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'muxgate-e2e-redis-'))
  const redis = await startDaemon('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', dir],
    { port, stopSignal: 'SIGKILL', install: 'redis-server' })
  return { url: `redis://127.0.0.1:${port}/`, stop: redis.stop }
}

/** The operators' nginx file, as shipped (tests/common/nginx.rs runs the same file). */
export const NGINX_CONFIG = path.resolve(WEB_DIR, '..', 'deploy', 'nginx.conf')

/**
 * The shipped nginx file with `listen` set to `port` on loopback and the `server` lines of
 * `upstream muxgate` replaced by one per instance port, with the first one's parameters.
 */
export function renderNginx (shipped, port, instancePorts) {
  const out = []
  let inUpstream = false
  let serversWritten = false
  let listens = 0
  for (const line of shipped.split('\n')) {
    const code = line.trim()
    if (code.startsWith('upstream muxgate {')) inUpstream = true
    else if (inUpstream && code === '}') inUpstream = false
    else if (inUpstream && code.startsWith('server ')) {
      if (!serversWritten) {
        const params = code.replace(/;$/, '').split(/\s+/).slice(2).join(' ')
        for (const p of instancePorts) out.push(`    server 127.0.0.1:${p} ${params};`)
        serversWritten = true
      }
      continue
    } else if (code.startsWith('listen ')) {
      listens++
      out.push(`    listen 127.0.0.1:${port};`)
      continue
    }
    out.push(line)
  }
  assert.ok(serversWritten && listens === 1, `${NGINX_CONFIG} no longer has one \`listen\` and \`server\` lines in \`upstream muxgate\``)
  return out.join('\n')
}

/** nginx on a free loopback port, running the shipped file in front of `instancePorts`. */
export async function startNginx (instancePorts) {
  const port = await freePort()
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'muxgate-e2e-nginx-'))
  // nginx's workers run as `nobody` when it starts as root: they must reach the prefix.
  fs.chmodSync(dir, 0o755)
  fs.writeFileSync(path.join(dir, 'muxgate.conf'), renderNginx(fs.readFileSync(NGINX_CONFIG, 'utf8'), port, instancePorts))
  fs.writeFileSync(path.join(dir, 'nginx.conf'), `daemon off;
worker_processes 1;
pid ${dir}/nginx.pid;
error_log ${dir}/error.log warn;
events { worker_connections 4096; }
http {
    access_log ${dir}/access.log;
    client_body_temp_path ${dir}/client_body;
    proxy_temp_path ${dir}/proxy;
    fastcgi_temp_path ${dir}/fastcgi;
    uwsgi_temp_path ${dir}/uwsgi;
    scgi_temp_path ${dir}/scgi;
    include ${dir}/muxgate.conf;
}
`)
  // Debian installs it in /usr/sbin, off a user's PATH.
  const bin = process.env.NGINX ?? (fs.existsSync('/usr/sbin/nginx') ? '/usr/sbin/nginx' : 'nginx')
  const nginx = await startDaemon(bin, ['-p', dir, '-c', path.join(dir, 'nginx.conf'), '-e', path.join(dir, 'error.log')],
    { port, stopSignal: 'SIGTERM', install: 'nginx' })
  return {
    url: `http://127.0.0.1:${port}`,
    errorLog: () => fs.readFileSync(path.join(dir, 'error.log'), 'utf8'),
    stop: nginx.stop,
  }
}

/**
 * Two gateways in cluster mode on one redis-server behind nginx (the shipped deploy/nginx.conf),
 * relaying to one mock: `stack.url` is nginx's, `stack.gateways` the instances (ids gw-a, gw-b),
 * `stack.gateway` the first (for its admin views, which are cluster-wide). The drain is long
 * (30 s) so a SIGTERMed instance's streams finish while their clients move.
 */
export async function startCluster ({ staticDir, config } = {}) {
  const mock = await startMock()
  const redis = await startRedis()
  const ids = ['gw-a', 'gw-b']
  const ports = await Promise.all(ids.map(() => freePort()))
  const gateways = await Promise.all(ids.map((id, i) => startGateway({
    port: ports[i],
    mockUrl: mock.url,
    staticDir,
    drainMs: 30_000,
    // behind nginx every client has nginx's address
    config: `${config ?? ''}\n[server]\nmax_pending_connections_per_ip = 1024\n`,
    env: { MUXGATE_REDIS_URL: redis.url, MUXGATE_INSTANCE_ID: id },
  }).then(g => Object.assign(g, { id }))))
  const nginx = await startNginx(ports)
  return {
    mock,
    redis,
    nginx,
    gateways,
    gateway: gateways[0],
    url: nginx.url,
    /** The gateway holding `user`'s one connection, from the cluster-wide admin view of a live one. */
    async holding (user) {
      const live = gateways.find(g => g.proc.exitCode === null && g.proc.signalCode === null)
      const view = await live.admin(user)
      const held = Object.entries(view.instances ?? {}).filter(([, l]) => l.connections === 1).map(([key]) => key.split('/')[0])
      return held.length === 1 ? gateways.find(g => g.id === held[0]) : null
    },
    async stop () {
      await nginx.stop()
      await Promise.all(gateways.map(g => g.stop('SIGKILL')))
      await redis.stop()
      await mock.stop()
    },
  }
}

/** A TCP proxy to `port`, so a test can cut every connection as a network failure would. */
export async function startProxy (targetPort) {
  const pairs = new Set()
  const server = net.createServer((client) => {
    const upstream = net.connect(targetPort, '127.0.0.1')
    const pair = { client, upstream }
    pairs.add(pair)
    client.pipe(upstream)
    upstream.pipe(client)
    const end = () => { pairs.delete(pair); client.destroy(); upstream.destroy() }
    client.on('error', end); upstream.on('error', end)
    client.on('close', end); upstream.on('close', end)
  })
  await new Promise(resolve => server.listen(0, '127.0.0.1', resolve))
  return {
    port: server.address().port,
    url: `http://127.0.0.1:${server.address().port}`,
    get connections () { return pairs.size },
    /** Resets every proxied connection, both ways. */
    cut () {
      for (const { client, upstream } of pairs) { client.resetAndDestroy?.() ?? client.destroy(); upstream.resetAndDestroy?.() ?? upstream.destroy() }
      pairs.clear()
    },
    close: () => new Promise(resolve => { for (const p of pairs) { p.client.destroy(); p.upstream.destroy() } server.close(resolve) }),
  }
}

/**
 * Debian's Chromium, headless, with ONE persistent context (fresh profile) for all tabs.
 * @param {{initScript?: Function}} [opts] a script every page runs before its own scripts
 */
export async function launchBrowser ({ initScript } = {}) {
  if (!fs.existsSync(CHROMIUM)) throw new Error(`no Chromium at ${CHROMIUM}: apt-get install -y chromium`)
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'muxgate-chromium-'))
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    viewport: { width: 1100, height: 760 },
  })
  if (initScript) await context.addInitScript(initScript)
  const close = async () => {
    await context.close().catch(() => {})
    fs.rmSync(profile, { recursive: true, force: true })
  }
  return { context, close }
}

/**
 * Opens `n` tabs of the demo at `url` and waits until each one's shim has a role. All tabs
 * are open before any stream starts (page loads would queue behind open streams too).
 */
export async function openTabs (context, url, n) {
  const pages = []
  const blank = context.pages().find(p => p.url() === 'about:blank')
  for (let i = 0; i < n; i++) {
    const page = i === 0 && blank ? blank : await context.newPage()
    await page.goto(url)
    pages.push(page)
  }
  for (const page of pages) {
    await page.waitForFunction(() => window.muxgateDemo && window.muxgateDemo.mux.role !== 'electing', null, { timeout: 15_000 })
  }
  return pages
}

/**
 * The start every browser test repeats, as one fixture: a fresh browser (running
 * `initScript` in each page), `n` tabs of the demo signed in as `user` at `base`, and unless
 * `shared` is false, one leader shared by all; `standby: true` turns the shim's standby
 * connection on (off by default, as in the shim); `focus: 'one'` leaves only the last tab focused
 * (see oneForeground; 'all', the default, is Playwright's: every page acts focused). Calls `body` with the pages, the statuses, the
 * leader's index `li` (-1 without one) and `user`; closes the browser after, whatever happens.
 * @template T
 * @param {{base: string, user: string, n: number, initScript?: Function, shared?: boolean, standby?: boolean, focus?: 'all'|'one'}} setup
 * @param {(tabs: {context: any, pages: any[], status: any[], li: number, user: string}) => Promise<T>} body
 * @returns {Promise<T>}
 */
export async function withTabs ({ base, user, n, initScript, shared = true, standby = false, focus = 'all' }, body) {
  const { context, close } = await launchBrowser({ initScript })
  try {
    const pages = await openTabs(context, demoUrl(base, user, { standby }), n)
    if (focus === 'one') await oneForeground(context, pages, pages.length - 1)
    const status = shared ? await waitShared(pages) : await statuses(pages)
    const li = status.findIndex(s => s.role === 'leader')
    return await body({ context, pages, status, li, user })
  } finally { await close() }
}

/**
 * Makes `pages[fg]` the one foreground tab, as in a real browser window: Playwright turns on
 * focus emulation in every page it opens, so all of them act focused (`document.hasFocus()`
 * true, the focused prompt's caret blinking and painting every 500 ms in each). This turns it
 * off in the others (a CDP session of its own per page; the setting outlives the session) and
 * brings `pages[fg]` to the front, so the browser's one real focus is there. Headless
 * Chromium still keeps every page visible (`visibilityState` stays 'visible'): background
 * tabs here still run frames for what animates on their own (a CSS animation), which a
 * hidden tab of a real browser would not.
 * @param {any} context @param {any[]} pages @param {number} fg
 */
export async function oneForeground (context, pages, fg) {
  for (const [i, page] of pages.entries()) {
    if (i === fg) continue
    const cdp = await context.newCDPSession(page)
    await cdp.send('Emulation.setFocusEmulationEnabled', { enabled: false })
    await cdp.detach()
  }
  await pages[fg].bringToFront()
  const focused = await Promise.all(pages.map(p => p.evaluate(() => document.hasFocus())))
  const wrong = focused.map((f, i) => f !== (i === fg) ? i : -1).filter(i => i >= 0)
  if (wrong.length) throw new Error(`oneForeground: document.hasFocus() is wrong in tabs ${wrong.join(', ')}`)
}

/** Every tab's shim status. */
export function statuses (pages) {
  return Promise.all(pages.map(p => p.evaluate(() => window.muxgateDemo.mux.status())))
}

/** Waits until exactly one tab leads, the rest follow, all count `pages.length` tabs, socket open. */
export async function waitShared (pages, what = 'one leader shared by all tabs') {
  return waitFor(async () => {
    const s = await statuses(pages)
    const leaders = s.filter(x => x.role === 'leader').length
    const ok = leaders === 1 && s.filter(x => x.role === 'follower').length === pages.length - 1 &&
      s.every(x => x.tabs === pages.length && x.connection === 'open')
    return ok && s
  }, { what })
}

/** Index of the leader tab. */
export async function leaderIndex (pages) {
  const s = await statuses(pages)
  return s.findIndex(x => x.role === 'leader')
}

/**
 * Starts one stream in `page` through the demo's shim; its progress is kept in
 * `window.__runs[key]` (text, deltas, first/last data time, error).
 */
export function startChat (page, key, prompt, model = 'deepseek-v3.2') {
  return page.evaluate(({ key, prompt, model }) => {
    window.__runs = window.__runs || {}
    const now = () => performance.timeOrigin + performance.now()
    const stream = window.muxgateDemo.mux.chat({ model, messages: [{ role: 'user', content: prompt }] })
    // maxGapMs: the longest wait between two text chunks (a handover shows up here)
    const run = { id: stream.id, text: '', deltas: 0, firstAt: null, lastAt: null, endAt: null, ended: false, error: null, result: null, maxGapMs: 0, maxGapAt: null }
    window.__runs[key] = run
    ;(async () => {
      try {
        for await (const text of stream) {
          const t = now()
          if (run.firstAt === null) run.firstAt = t
          if (run.lastAt !== null && t - run.lastAt > run.maxGapMs) {
            run.maxGapMs = t - run.lastAt
            run.maxGapAt = t
          }
          run.lastAt = t
          run.text += text
          run.deltas++
        }
        run.result = await stream.result
      } catch (err) {
        run.error = { code: err.code, message: err.message }
      } finally {
        run.endAt = now()
        run.ended = true
      }
    })()
    return stream.id
  }, { key, prompt, model })
}

/**
 * Starts one stream in `page` read with `parts()` (the whole answer: reasoning, tool calls...);
 * `window.__answers[key]` keeps its id, every part, the result or the error.
 * @param {object} request what `mux.chat` takes
 */
export function startAnswer (page, key, request) {
  return page.evaluate(({ key, request }) => {
    window.__answers = window.__answers || {}
    const stream = window.muxgateDemo.mux.chat(request)
    const answer = { id: stream.id, parts: [], result: null, error: null, ended: false }
    window.__answers[key] = answer
    ;(async () => {
      try {
        for await (const part of stream.parts()) answer.parts.push(part)
        answer.result = await stream.result
      } catch (err) {
        answer.error = { code: err.code, message: err.message, status: err.status, upstream: err.upstream }
      } finally { answer.ended = true }
    })()
    return stream.id
  }, { key, request })
}

/** Waits for `startAnswer`'s stream `key` to end in every page; returns the answers. */
export async function waitAnswers (pages, key, { timeoutMs = 60_000 } = {}) {
  return waitFor(async () => {
    const all = await Promise.all(pages.map(p => p.evaluate(k => (window.__answers || {})[k] ?? null, key)))
    return all.every(a => a && a.ended) && all
  }, { timeoutMs, what: `every tab's answer "${key}" to end` })
}

/** The run `key` of `page`. */
export function readRun (page, key) {
  return page.evaluate(k => (window.__runs || {})[k] ?? null, key)
}

/** Waits for run `key` to end in every page; returns the runs. */
export async function waitRuns (pages, key, { timeoutMs = 60_000 } = {}) {
  return waitFor(async () => {
    const runs = await Promise.all(pages.map(p => readRun(p, key)))
    return runs.every(r => r && r.ended) && runs
  }, { timeoutMs, what: `every tab's stream "${key}" to end` })
}

/**
 * Plain SSE from `page`: a streaming fetch of the mock's chat completions (another origin,
 * so its own 6-connection group). Progress in `window.__sse[key]`, like startChat.
 */
export function startSse (page, key, mockUrl, prompt) {
  return page.evaluate(({ key, mockUrl, prompt }) => {
    window.__sse = window.__sse || {}
    const now = () => performance.timeOrigin + performance.now()
    const run = { text: '', deltas: 0, firstAt: null, lastAt: null, endAt: null, ended: false, error: null }
    window.__sse[key] = run
    ;(async () => {
      try {
        const res = await fetch(`${mockUrl}/v1/chat/completions`, {
          method: 'POST',
          headers: { 'content-type': 'application/json' },
          body: JSON.stringify({ model: 'deepseek-v3.2', stream: true, messages: [{ role: 'user', content: prompt }] }),
        })
        if (!res.ok) throw new Error(`HTTP ${res.status}`)
        const reader = res.body.pipeThrough(new TextDecoderStream()).getReader()
        let buf = ''
        for (;;) {
          const { value, done } = await reader.read()
          if (done) break
          buf += value
          let nl
          while ((nl = buf.indexOf('\n')) >= 0) {
            const line = buf.slice(0, nl).trim()
            buf = buf.slice(nl + 1)
            if (!line.startsWith('data:')) continue
            const data = line.slice(5).trim()
            if (data === '[DONE]') continue
            const text = JSON.parse(data).choices?.[0]?.delta?.content
            if (text) {
              const t = now()
              if (run.firstAt === null) run.firstAt = t
              run.lastAt = t
              run.text += text
              run.deltas++
            }
          }
        }
      } catch (err) {
        run.error = { message: String(err) }
      } finally {
        run.endAt = now()
        run.ended = true
      }
    })()
  }, { key, mockUrl, prompt })
}

export async function waitSse (pages, key, { timeoutMs = 90_000 } = {}) {
  return waitFor(async () => {
    const runs = await Promise.all(pages.map(p => p.evaluate(k => (window.__sse || {})[k] ?? null, key)))
    return runs.every(r => r && r.ended) && runs
  }, { timeoutMs, what: `every tab's SSE stream "${key}" to end` })
}

/**
 * The most streams that were receiving at one moment: each stream counts from its first to
 * its last text chunk. With all streams started together this is how many the browser let
 * run at once (a count, not a timing).
 */
export function maxConcurrent (runs) {
  const events = []
  for (const r of runs) {
    if (r.firstAt === null || r.lastAt === null) continue
    events.push([r.firstAt, 1], [r.lastAt, -1])
  }
  // at equal times, an end comes before a start: touching is not overlapping
  events.sort((a, b) => a[0] - b[0] || a[1] - b[1])
  let now = 0
  let max = 0
  for (const [, d] of events) { now += d; max = Math.max(max, now) }
  return max
}

/**
 * How many of the streams received data while at least `others` other streams were receiving.
 */
export function streamsOverlapping (runs, others) {
  const live = runs.filter(r => r.firstAt !== null && r.lastAt !== null)
  return live.filter(r => live.filter(o => o !== r && o.firstAt < r.lastAt && r.firstAt < o.lastAt).length >= others).length
}

/**
 * Kills `page`'s renderer through the DevTools protocol (`Page.crash`): no `pagehide`, no
 * last message; its Web Lock is freed and its sockets drop, as when a tab's process dies.
 */
export async function crashPage (context, page) {
  const cdp = await context.newCDPSession(page)
  // the call never answers: the page it would answer from is gone
  cdp.send('Page.crash').catch(() => {})
  await waitFor(() => page.evaluate(() => false).then(() => false, () => true), { timeoutMs: 10_000, stepMs: 50, what: 'the renderer to die' })
}

/**
 * An init script that counts the WebSockets a page opens (`window.__sockets`), for the
 * fallback tests' socket bounds.
 */
export function countSockets () {
  const Native = window.WebSocket
  window.__sockets = 0
  window.WebSocket = class extends Native {
    constructor (...args) {
      super(...args)
      window.__sockets++
    }
  }
}

/** Sockets opened by all `pages` (with `countSockets` installed). */
export async function socketsOpened (pages) {
  const n = await Promise.all(pages.map(p => p.evaluate(() => window.__sockets ?? 0).catch(() => 0)))
  return n.reduce((a, b) => a + b, 0)
}

/** Freezes `page` through the DevTools protocol; see the freeze test for why both calls. */
export async function freezePage (context, page) {
  const cdp = await context.newCDPSession(page)
  await cdp.send('Page.setWebLifecycleState', { state: 'frozen' })
  // A page that still runs answers; one that froze never does. The bound is long because a
  // page that runs may answer late on a loaded machine: with 1.5 s, a running page answering
  // late was taken for a frozen one, nothing stopped it, and test 4b could only wait in vain
  // for its drop (a likely cause of its flake at load 20+). Headless Chromium never freezes,
  // so the bound is not spent there.
  const frozen = await Promise.race([
    page.evaluate(() => true).then(() => false),
    sleep(10_000).then(() => true),
  ])
  let paused = false
  if (!frozen) {
    // This Chromium accepted the call but the page still runs (headless keeps every page
    // visible, and only hidden pages freeze). Stop its JavaScript instead: to the other tabs a
    // debugger-paused leader is exactly a frozen one (holds its lock, answers nothing, its
    // socket stays open), except that no `freeze` event lets it hand over first.
    await cdp.send('Debugger.enable')
    await cdp.send('Debugger.pause')
    paused = true
  }
  return {
    frozenByLifecycle: frozen,
    async thaw () {
      if (paused) await cdp.send('Debugger.resume').catch(() => {})
      await cdp.send('Page.setWebLifecycleState', { state: 'active' }).catch(() => {})
      await cdp.detach().catch(() => {})
    },
  }
}

let userSeq = 0

/**
 * Names a fresh user per scenario (the gateway's per-user state, sockets and streams, must not
 * carry over between scenarios): `userNamer('e2e')('closed')` → `e2e-closed-<pid>-<n>`.
 */
export const userNamer = prefix => tag => `${prefix}-${tag}-${process.pid}-${++userSeq}`

/** The demo page, signed in as `user`. */
export const demoUrl = (base, user, { standby = false } = {}) => `${base}/?user=${encodeURIComponent(user)}${standby ? '&standby=1' : ''}`

/** Starts one stream per tab (except those in `skip`), each with its own prompt; returns the prompts. */
export async function startAll (pages, key, shape, skip = new Set()) {
  const prompts = []
  for (let i = 0; i < pages.length; i++) {
    const prompt = mockPrompt(`${key} tab ${i}: tell me something`, shape)
    prompts.push(prompt)
    if (!skip.has(i)) await startChat(pages[i], key, prompt)
  }
  return prompts
}

/** Every tab in `indexes` ended without error with exactly the text and deltas its prompt asked for. */
export function assertExact (runs, prompts, chunks, indexes) {
  for (const i of indexes) {
    const run = runs[i]
    assert.equal(run.error, null, `tab ${i} (${run.id}) failed: ${JSON.stringify(run.error)}`)
    assert.equal(run.text, expectedText(prompts[i], chunks), `tab ${i} (${run.id}) text`)
    assert.equal(run.deltas, chunks, `tab ${i} got ${run.deltas} deltas`)
  }
}

/** Waits (bounded) until every page's run `key` has shown at least `n` deltas. */
export const underWay = (pages, key, n) => waitFor(async () => (await Promise.all(pages.map(p => readRun(p, key)))).every(r => r && r.deltas >= n), { what: `every "${key}" stream under way` })

/**
 * An init script for fallback mode: no BroadcastChannel (so every tab is `solo`), and a count of
 * the WebSockets each page opened in `window.__sockets`.
 */
export function fallbackCountingSockets () {
  delete window.BroadcastChannel
  const Native = window.WebSocket
  window.__sockets = 0
  window.WebSocket = class extends Native {
    constructor (...args) { super(...args); window.__sockets++ }
  }
}
