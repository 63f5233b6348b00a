// In-memory stand-ins for the browser APIs the shim uses (Web Locks, WebSocket, window,
// document), and a small fake gateway that speaks protocol v1. They let the cross-tab logic
// run in node; the real gateway and Chromium are exercised by ../e2e.
import Mux from '../src/mux.js'
import ChatStream from '../src/stream.js'

/** A LockManager with the semantics the shim relies on: FIFO queue, ifAvailable, steal, signal. */
export class FakeLocks {
  constructor () {
    this.held = new Map()
    this.queues = new Map()
    /** How long a grant takes to reach its tab (a browser's IPC, a busy renderer). */
    this.grantDelayMs = 0
    /** Requests with `steal` so far (a hung leader should cost one). */
    this.steals = 0
  }

  request (name, options, cb) {
    if (typeof options === 'function') { cb = options; options = {} }
    if (options.steal) this.steals++
    return new Promise((resolve, reject) => {
      const req = { cb, resolve, reject }
      const holder = this.held.get(name)
      if (options.steal) {
        if (holder) {
          this.held.delete(name)
          holder.stolen = true
          holder.reject(new DOMException('The lock was stolen', 'AbortError'))
        }
        this.grant(name, req)
        return
      }
      if (!holder && !(this.queues.get(name)?.length)) {
        this.grant(name, req)
        return
      }
      if (options.ifAvailable) {
        setTimeout(() => Promise.resolve().then(() => cb(null)).then(resolve, reject))
        return
      }
      const queue = this.queues.get(name) ?? []
      this.queues.set(name, queue)
      queue.push(req)
      options.signal?.addEventListener('abort', () => {
        const i = queue.indexOf(req)
        if (i >= 0) {
          queue.splice(i, 1)
          reject(new DOMException('aborted', 'AbortError'))
        }
      })
    })
  }

  grant (name, req) {
    const holder = { stolen: false, reject: req.reject }
    this.held.set(name, holder)
    setTimeout(() => {
      Promise.resolve()
        .then(() => req.cb({ name, mode: 'exclusive' }))
        .then((v) => { if (!holder.stolen) req.resolve(v) }, (e) => { if (!holder.stolen) req.reject(e) })
        .finally(() => this.release(name, holder))
    }, this.grantDelayMs)
  }

  release (name, holder) {
    if (this.held.get(name) !== holder) return
    this.held.delete(name)
    const next = this.queues.get(name)?.shift()
    if (next) this.grant(name, next)
  }
}

/** A window/document pair with the events the shim listens to. */
export function fakePage () {
  const window = new EventTarget()
  window.location = { href: 'http://127.0.0.1:8080/' }
  const document = new EventTarget()
  document.visibilityState = 'visible'
  return {
    window,
    document,
    pagehide (persisted = false) { window.dispatchEvent(Object.assign(new Event('pagehide'), { persisted })) },
    pageshow (persisted = true) { window.dispatchEvent(Object.assign(new Event('pageshow'), { persisted })) },
    freeze () { document.dispatchEvent(new Event('freeze')) },
    resume () { document.dispatchEvent(new Event('resume')) },
  }
}

/**
 * A token the fake gateway reads like a JWT (header.payload.signature, payload base64url
 * JSON): `sub`, `tier`, `exp` (unix seconds). Its signature is `ok` or, for a forged one, `bad`.
 */
export function fakeToken ({ sub = 'u', tier = 'pro', exp, sig = 'ok' } = {}) {
  const payload = Buffer.from(JSON.stringify({ sub, tier, exp })).toString('base64url')
  return `h.${payload}.${sig}`
}

/** Claims of a `fakeToken`, or of a plain test token ('bad' is refused), or null. */
function readToken (token) {
  if (token === 'bad' || typeof token !== 'string') return null
  const parts = token.split('.')
  if (parts.length !== 3) return { sub: 'u', tier: 'pro', exp: null }
  if (parts[2] !== 'ok') return null
  try {
    const claims = JSON.parse(Buffer.from(parts[1], 'base64url').toString())
    return { sub: claims.sub, tier: claims.tier, exp: typeof claims.exp === 'number' ? claims.exp : null }
  } catch {
    return null
  }
}

/** The text the fake gateway streams for `chunks` chunks of stream `id`. */
export function fakeAnswer (id, chunks) {
  return Array.from({ length: chunks }, (_, k) => `${id}#${k} `).join('')
}

/**
 * The answer the fake gateway streams for stream `id` when its prompt says `reasoning=R`
 * and/or `tools=T`: R reasoning deltas, then T tool calls whose fragments interleave (the
 * first of each carries id, type and name; each call's arguments JSON is cut into 4-char
 * pieces, some inside an escape). `frames` are the deltas without `seq`; `reasoning` and
 * `toolCalls` what a reader assembles from them.
 */
export function fakeToolAnswer (id, { reasoning = 0, tools = 0 } = {}) {
  const frames = []
  let thought = ''
  for (let k = 0; k < reasoning; k++) {
    const piece = `${id} thinks ${k}. `
    thought += piece
    frames.push({ type: 'delta', id, text: '', reasoning: piece })
  }
  const toolCalls = Array.from({ length: tools }, (_, i) => ({
    id: `call_${i}`, type: 'function',
    function: { name: `tool_${i}`, arguments: JSON.stringify({ stream: id, i, quote: 'say "hi"\n\u00e9' }) },
  }))
  toolCalls.forEach((c, index) => frames.push({ type: 'delta', id, text: '', tool_calls: [{ index, id: c.id, type: c.type, function: { name: c.function.name, arguments: '' } }] }))
  const pieces = toolCalls.map(c => c.function.arguments.match(/[\s\S]{1,4}/g))
  for (let k = 0; pieces.some(p => k < p.length); k++) {
    pieces.forEach((p, index) => {
      if (k < p.length) frames.push({ type: 'delta', id, text: '', tool_calls: [{ index, function: { arguments: p[k] } }] })
    })
  }
  return { frames, reasoning: thought, toolCalls }
}

/** The usage the fake gateway reports with a tool-call answer (every detail field). */
export const FAKE_TOOL_USAGE = Object.freeze({
  prompt_tokens: 30, completion_tokens: 25, total_tokens: 55,
  prompt_tokens_details: { cached_tokens: 10 }, completion_tokens_details: { reasoning_tokens: 5 },
})

/** The error body of a `fail=STATUS` prompt, as the gateway relays an upstream's. */
export const fakeUpstreamError = (id, status) => ({
  type: 'error', id, code: 'upstream_error', message: 'maximum context length exceeded', status,
  upstream: { type: 'invalid_request_error', code: 'context_length_exceeded', param: 'messages' },
})

/**
 * A fake gateway: streams outlive connections and are resumed by `hello.resume`, like the
 * real one. Prompts say how many chunks: `chunks=N` in the last message; `reasoning=R` and
 * `tools=T` stream `fakeToolAnswer` instead; `fail=STATUS` ends the stream with
 * `fakeUpstreamError` instead of `done`.
 * - `maxConnections`: a hello over it gets `error` (id null) and close 4429, as the gateway's
 *   per-user cap does.
 * - `refresh` (docs/protocol.md extension): `knowsRefresh: false` answers it like an older
 *   gateway (bad_request); tokens (see `fakeToken`) expire: an `open` after `exp` is refused,
 *   and `tokenGraceMs` after `exp` the connection is closed with 4401.
 * - `batch` (docs/protocol.md extension): a hello with `batch: true` is welcomed with it, and
 *   the frames sent in one task then go out as one message (an array when there are several),
 *   as the gateway packs one write; `knowsBatch: false` is an older gateway (one frame each).
 * - `resume` (docs/protocol.md extension): moves streams onto a welcomed connection, answered
 *   by `resumed`; `knowsResume: false` answers it like an older gateway (bad_request).
 *   `welcome.limits.max_connections` says `maxConnections` when it is finite.
 */
export class FakeGateway {
  constructor ({ chunkMs = 5, maxConnections = Infinity, knowsRefresh = true, knowsBatch = true, knowsResume = true, tokenGraceMs = 60_000 } = {}) {
    this.chunkMs = chunkMs
    this.knowsResume = knowsResume
    /** `resume` frames received (on welcomed connections). */
    this.resumeFrames = []
    this.knowsBatch = knowsBatch
    /** Messages delivered to the tabs: [frame count, is an array]. */
    this.messages = []
    this.maxConnections = maxConnections
    this.knowsRefresh = knowsRefresh
    this.tokenGraceMs = tokenGraceMs
    /** Every hello, refused ones too. */
    this.attempts = 0
    this.refusedCap = 0
    /** `refresh` frames received, and how many were accepted. */
    this.refreshes = 0
    this.refreshed = 0
    this.streams = new Map()
    this.sockets = new Set()
    /** Every WebSocket a tab created, in order, with `createdAt` (ms), welcomed or not. */
    this.created = []
    this.connectionsTotal = 0
    this.aborted = 0
    this.opened = 0
    this.resumes = []
    const gw = this
    this.WebSocket = class extends FakeSocket {
      constructor (url, protocol) { super(gw, url, protocol) }
    }
  }

  get open () {
    return [...this.sockets].filter(s => s.readyState === 1).length
  }

  /** Welcomed connections still open. */
  get live () {
    return [...this.sockets].filter(s => s.readyState === 1 && s.hello).length
  }

  /** Moves `ws`'s expiry to `exp`, arming the 4401 close at `exp` + grace. */
  expireAt (ws, exp) {
    ws.exp = exp
    clearTimeout(ws.expiryTimer)
    if (exp === null) return
    ws.expiryTimer = setTimeout(() => {
      this.frame(ws, { type: 'error', id: null, code: 'unauthorized', message: 'token expired' })
      ws.serverClose(4401, 'token expired')
    }, Math.max(0, exp * 1000 + this.tokenGraceMs - Date.now()))
  }

  frame (ws, frame) {
    if (ws.readyState !== 1) return
    ws.deliver(frame)
  }

  handle (ws, msg) {
    if (!ws.hello) {
      if (msg.type !== 'hello') return ws.serverClose(4401, 'hello first')
      this.attempts++
      const claims = readToken(msg.token)
      if (!claims || (claims.exp !== null && claims.exp * 1000 <= Date.now())) {
        this.frame(ws, { type: 'error', id: null, code: 'unauthorized', message: 'bad token' })
        return ws.serverClose(4401, 'unauthorized')
      }
      if (this.live >= this.maxConnections) {
        this.refusedCap++
        this.frame(ws, { type: 'error', id: null, code: 'too_many_streams', message: `at most ${this.maxConnections} simultaneous connections per user` })
        return ws.serverClose(4429, 'too many connections')
      }
      ws.hello = true
      ws.claims = claims
      ws.batch = this.knowsBatch && msg.batch === true
      this.expireAt(ws, claims.exp)
      this.connectionsTotal++
      const resumed = []
      const missing = []
      this.resumes.push(msg.resume ?? [])
      const limits = { max_streams: 32, max_frame_bytes: 1048576 }
      if (Number.isFinite(this.maxConnections)) limits.max_connections = this.maxConnections
      const welcome = { type: 'welcome', session: `s${this.connectionsTotal}`, user: 'u', tier: 'pro', heartbeat_ms: 15000, limits }
      if (claims.exp !== null) welcome.exp = claims.exp
      if (ws.batch) welcome.batch = true
      this.attach(ws, msg.resume ?? [], welcome)
      return
    }
    if (msg.type === 'resume' && this.knowsResume) {
      this.resumeFrames.push(msg.resume ?? [])
      return this.attach(ws, msg.resume ?? [], { type: 'resumed' })
    }
    switch (msg.type) {
      case 'open': {
        if (ws.exp !== null && ws.exp * 1000 <= Date.now()) {
          return this.frame(ws, { type: 'error', id: msg.id, code: 'unauthorized', message: 'token expired: send refresh' })
        }
        const live = this.streams.get(msg.id)
        if (live && !live.finished) return this.frame(ws, { type: 'error', id: msg.id, code: 'duplicate_id', message: 'dup' })
        const content = msg.messages.at(-1).content
        const chunks = Number(/chunks=(\d+)/.exec(content)?.[1] ?? 5)
        const reasoning = Number(/reasoning=(\d+)/.exec(content)?.[1] ?? 0)
        const tools = Number(/tools=(\d+)/.exec(content)?.[1] ?? 0)
        const fail = Number(/fail=(\d+)/.exec(content)?.[1] ?? 0)
        const script = reasoning || tools ? fakeToolAnswer(msg.id, { reasoning, tools }).frames : null
        const s = { id: msg.id, ws, log: [], seq: 0, chunks, script, tools, fail, finished: false, timer: null }
        this.streams.set(msg.id, s)
        this.opened++
        this.frame(ws, { type: 'start', id: msg.id, model: msg.model })
        s.timer = setInterval(() => this.tick(s), this.chunkMs)
        return
      }
      case 'cancel': {
        const s = this.streams.get(msg.id)
        if (!s || s.finished) return this.frame(ws, { type: 'error', id: msg.id, code: 'not_found', message: 'no live stream' })
        this.aborted++
        this.finish(s, { type: 'error', id: s.id, code: 'cancelled', message: 'cancelled by the client' })
        return
      }
      case 'ping':
        return this.frame(ws, { type: 'pong', ts: msg.ts })
      case 'refresh': {
        if (!this.knowsRefresh) break
        this.refreshes++
        const claims = readToken(msg.token)
        const ok = claims && claims.sub === ws.claims.sub && claims.tier === ws.claims.tier &&
          (claims.exp === null || claims.exp * 1000 > Date.now())
        if (!ok) return this.frame(ws, { type: 'error', id: null, code: 'unauthorized', message: 'refresh refused: bad token, or another user or tier' })
        this.refreshed++
        this.expireAt(ws, claims.exp)
        return this.frame(ws, { type: 'refreshed', exp: claims.exp })
      }
      default:
    }
    return this.frame(ws, { type: 'error', id: null, code: 'bad_request', message: 'unknown type' })
  }

  /** Answers a resume list with `answer` (its `resumed` filled in), then each missing id's
   * error, then the replay: the order the gateway keeps. */
  attach (ws, list, answer) {
    const resumed = []
    const missing = []
    for (const r of list) {
      if (this.streams.has(r.id)) resumed.push(r)
      else missing.push(r.id)
    }
    this.frame(ws, { ...answer, resumed: resumed.map(r => r.id) })
    for (const id of missing) this.frame(ws, { type: 'error', id, code: 'not_found', message: 'no such stream' })
    for (const r of resumed) {
      const s = this.streams.get(r.id)
      s.ws = ws
      for (const f of s.log) if (f.seq > r.after) this.frame(ws, f)
    }
  }

  tick (s) {
    const k = s.seq
    if (k < (s.script ? s.script.length : s.chunks)) {
      const f = s.script ? { ...s.script[k], seq: ++s.seq } : { type: 'delta', id: s.id, seq: ++s.seq, text: `${s.id}#${k} ` }
      s.log.push(f)
      if (s.ws && s.ws.readyState === 1) this.frame(s.ws, f)
      return
    }
    if (s.fail) return this.finish(s, fakeUpstreamError(s.id, s.fail))
    if (s.script) {
      return this.finish(s, {
        type: 'done', id: s.id, finish_reason: s.tools ? 'tool_calls' : 'stop', usage: FAKE_TOOL_USAGE,
        cost_usd: 0.002, completion_id: `chatcmpl-${s.id}`, system_fingerprint: 'fp_fake',
      })
    }
    this.finish(s, { type: 'done', id: s.id, finish_reason: 'stop', usage: { prompt_tokens: 3, completion_tokens: s.chunks }, cost_usd: 0.001 })
  }

  finish (s, frame) {
    clearInterval(s.timer)
    s.finished = true
    const f = { ...frame, seq: ++s.seq }
    s.log.push(f)
    if (s.ws && s.ws.readyState === 1) this.frame(s.ws, f)
  }

  detach (ws) {
    clearTimeout(ws.expiryTimer)
    for (const s of this.streams.values()) if (s.ws === ws) s.ws = null
  }

  /** Drops every connection as a network failure would. */
  dropAll () {
    for (const ws of [...this.sockets]) ws.serverClose(1006, '')
  }

  goawayAll (reconnectAfterMs = 20) {
    for (const ws of [...this.sockets]) this.frame(ws, { type: 'goaway', reason: 'shutdown', reconnect_after_ms: reconnectAfterMs })
  }

  /** Forgets every stream, as a restarted process would. */
  restart () {
    for (const s of this.streams.values()) clearInterval(s.timer)
    this.streams.clear()
    this.dropAll()
  }

  stop () {
    for (const s of this.streams.values()) clearInterval(s.timer)
    for (const ws of [...this.sockets]) ws.serverClose(1001, 'bye')
  }
}

class FakeSocket {
  constructor (gw, url, protocol) {
    this.gw = gw
    this.url = url
    this.protocol = protocol
    this.readyState = 0
    this.hello = false
    this.batch = false
    /** Frames sent in this task (a batched connection), delivered at its end. */
    this.pending = null
    this.createdAt = performance.now()
    gw.sockets.add(this)
    gw.created.push(this)
    setTimeout(() => {
      if (this.readyState !== 0) return
      if (gw.refuse) return this.serverClose(1006, '')
      this.readyState = 1
      this.onopen?.({})
    })
  }

  send (data) {
    if (this.readyState !== 1) throw new Error('not open')
    const msg = JSON.parse(data)
    // written to the wire: the gateway reads it even if we close right after (as TCP would)
    setTimeout(() => this.gw.handle(this, msg))
  }

  deliver (frame) {
    if (!this.batch || frame.type === 'welcome') {
      const data = JSON.stringify(frame)
      setTimeout(() => {
        if (this.readyState !== 1 && frame.type !== 'error') return
        this.gw.messages.push([1, false])
        this.onmessage?.({ data })
      })
      return
    }
    // one write: what was sent in this task goes out together
    if (this.pending) return this.pending.push(frame)
    this.pending = [frame]
    setTimeout(() => {
      const frames = this.pending.filter(f => this.readyState === 1 || f.type === 'error')
      this.pending = null
      if (frames.length === 0) return
      this.gw.messages.push([frames.length, frames.length > 1])
      this.onmessage?.({ data: JSON.stringify(frames.length === 1 ? frames[0] : frames) })
    })
  }

  close (code = 1000, reason = '') {
    if (this.readyState >= 2) return
    this.readyState = 3
    this.gw.sockets.delete(this)
    this.gw.detach(this)
    setTimeout(() => this.onclose?.({ code, reason }))
  }

  serverClose (code, reason) {
    if (this.readyState >= 2) return
    this.readyState = 3
    this.gw.sockets.delete(this)
    this.gw.detach(this)
    setTimeout(() => this.onclose?.({ code, reason }))
  }
}

/** Polls `fn` until it returns a truthy value, or throws after `timeoutMs`. */
export async function until (fn, { timeoutMs = 5000, stepMs = 10, what = 'condition' } = {}) {
  const end = Date.now() + timeoutMs
  for (;;) {
    const v = await fn()
    if (v) return v
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`)
    await new Promise(r => setTimeout(r, stepMs))
  }
}

/** Reads a whole stream; resolves {text, error}. */
export async function collect (stream) {
  let text = ''
  try {
    for await (const t of stream) text += t
    return { text, error: null }
  } catch (error) {
    return { text, error }
  }
}

/** Reads a stream's parts (`stream.parts()`); resolves {parts, error}. */
export async function collectParts (stream) {
  const parts = []
  try {
    for await (const p of stream.parts()) parts.push(p)
    return { parts, error: null }
  } catch (error) {
    return { parts, error }
  }
}

/** Timings that make the cross-tab mechanisms run in milliseconds. */
export const FAST = { tabHeartbeatMs: 40, tabMaxMissed: 3, leaderMaxSilent: 4, collectMs: 150, backoffBaseMs: 20, backoffMaxMs: 200 }
let channelSeq = 0

/**
 * `n` fake tabs of one origin (their own BroadcastChannel name, node's BroadcastChannel, one
 * fake Web Locks manager), each a `Mux` talking to `gw`; `shared: false` is fallback mode.
 * The standby connection (DEFAULTS.standby) is off unless asked for (`standby: true`): the
 * other tests count the leader's sockets and hellos; test/standby.test.js covers it.
 */
export function fakeTabs (n, { gw, locks = new FakeLocks(), shared = true, token = 'tok', standby = false, ...opts } = {}) {
  const name = `tabs-${process.pid}-${++channelSeq}`
  return Array.from({ length: n }, () => {
    const page = fakePage()
    const mux = new Mux({
      url: 'ws://gw.test/v1/ws', token, name, WebSocket: gw.WebSocket,
      BroadcastChannel: shared ? BroadcastChannel : undefined, locks: shared ? locks : undefined,
      window: page.window, document: page.document, standby, ...FAST, ...opts,
    })
    return { mux, page }
  })
}

/** Opens a stream whose fake answer has `chunks` chunks. */
export const ask = (mux, chunks) => mux.chat({ model: 'm', messages: [{ role: 'user', content: `go chunks=${chunks}` }] })
export const roles = list => list.map(t => t.mux.role)
export const closeAll = list => list.forEach(t => t.mux.close())
/** Hangs a leader tab: it keeps its lock and socket but hears and says nothing on the bus. */
export function hang (tab) {
  tab.mux.bus.close()
  clearInterval(tab.mux.part.hbTimer)
  tab.mux.running = false
}

/** Waits for one leader, every other tab a follower, all joined and the socket open. */
export async function settled (list) {
  await until(() => roles(list).filter(r => r === 'leader').length === 1 &&
    roles(list).filter(r => r === 'follower').length === list.length - 1 &&
    list.every(t => t.mux.tabs === list.length) && list.every(t => t.mux.connection === 'open'), { what: 'one leader, all joined' })
}

/**
 * A mux whose streams answer with `script(request, n)`'s frames (without id), one per timer
 * tick (a `{pause: promise}` entry waits for the promise); `streams` keeps every stream and its
 * request. What mux.fetch needs of a Mux, for its tests and for comparing its bytes with the
 * gateway's own endpoint for the same frames.
 */
export function scriptedMux (script) {
  const mux = {
    streams: [],
    chat (request) {
      const n = mux.streams.length + 1
      const stream = new ChatStream(`t:${n}`, request)
      mux.streams.push({ request, stream })
      const frames = script(request, n)
      ;(async () => {
        for (const frame of frames) {
          await new Promise(resolve => setTimeout(resolve, 1))
          if (frame.pause) await frame.pause
          else stream.push({ ...frame, id: stream.id })
        }
      })()
      return stream
    },
  }
  return mux
}
