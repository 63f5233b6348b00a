// The whole answer in real Chromium: reasoning, tool calls, refusals and upstream errors as
// the demo page shows them, and as several tabs receive them over one socket. The gateway
// here is a script (Playwright's routeWebSocket) that speaks docs/protocol.md's issue-12
// frames the way the gateway relays the mock upstream's directives, so the shim and the demo
// are tested on their own; the real gateway's side is tested by the Rust suite.
import { after, before, test } from 'node:test'
import assert from 'node:assert/strict'
import fs from 'node:fs'
import path from 'node:path'
import {
  demoUrl, launchBrowser, openTabs, startAnswer, startStack, userNamer, waitAnswers, waitFor, waitShared, WEB_DIR,
} from './harness.js'

// Nothing listens here: every request of this origin is answered by the routes below.
const ORIGIN = 'http://127.0.0.1:38121'
const TYPES = { '.html': 'text/html', '.js': 'text/javascript', '.css': 'text/css' }

/** Serves web/ at ORIGIN from disk. */
async function serveWeb (context) {
  await context.route(`${ORIGIN}/**`, async (route) => {
    const url = new URL(route.request().url())
    const file = path.join(WEB_DIR, url.pathname === '/' ? 'index.html' : decodeURIComponent(url.pathname))
    if (!file.startsWith(WEB_DIR + path.sep) || !fs.existsSync(file) || !fs.statSync(file).isFile()) {
      return route.fulfill({ status: 404, body: 'not found' })
    }
    return route.fulfill({ status: 200, contentType: TYPES[path.extname(file)] ?? 'application/octet-stream', body: fs.readFileSync(file) })
  })
}

/** The `[[mock ...]]` directives of a prompt, as numbers or strings. */
function directives (content) {
  const out = {}
  for (const block of String(content).matchAll(/\[\[mock([^\]]*)\]\]/g)) {
    for (const kv of block[1].trim().split(/[\s,]+/).filter(Boolean)) {
      const [k, v] = kv.split('=')
      out[k] = /^\d+$/.test(v) ? Number(v) : v
    }
  }
  return out
}

/** Words of a prompt without its directives. */
const words = content => String(content).replace(/\[\[mock[^\]]*\]\]/g, '').trim().split(/\s+/)

/**
 * The frames (without `id` and `seq`) a stream of `open` gets, shaped like the mock upstream's
 * answers relayed by the gateway (spec of issue 12): `n` numbers the stream for tool-call ids.
 */
export function scriptedAnswer (open, n) {
  const last = open.messages.at(-1)
  const user = [...open.messages].reverse().find(m => m.role === 'user')
  const d = directives(user?.content ?? '')
  const tools = open.params?.tools ?? []
  const deltas = []
  const text = t => deltas.push({ type: 'delta', text: t })
  let reasoningTokens = 0
  if (d.fail) {
    return [{
      type: 'error', code: 'upstream_error', message: "This model's maximum context length is 8192 tokens", status: d.fail,
      upstream: { type: d.fail_type, code: d.fail_code, param: d.fail_param },
    }]
  }
  for (let k = 0; k < (d.reasoning ?? 0); k++) {
    deltas.push({ type: 'delta', text: '', reasoning: `step ${k} of thinking. ` })
    reasoningTokens++
  }
  let calls = []
  if (d.tools) {
    calls = Array.from({ length: d.tools }, (_, i) => ({
      name: tools.length ? tools[i % tools.length].function.name : `tool_${i}`,
      args: JSON.stringify({ city: ['Paris', 'Tokyo'][i % 2], note: 'said "hi"' }),
    }))
  } else if (tools.length && open.params?.tool_choice !== 'none' && last.role !== 'tool') {
    const city = words(last.content).find(w => /^[A-Z][a-z]+$/.test(w.replace(/\W/g, '')) && w !== 'What')?.replace(/\W/g, '') ?? 'Paris'
    calls = [{ name: tools[0].function.name, args: JSON.stringify({ city }) }]
  }
  if (d.refusal) {
    for (const piece of ["I'm sorry, ", 'but I ', "can't help ", 'with that.']) deltas.push({ type: 'delta', text: '', refusal: piece })
  } else if (calls.length === 0) {
    const answer = last.role === 'tool' ? `The tool answered: ${last.content}` : words(last.content).map((w, k) => `${w.toLowerCase()}${k}`).join(' ')
    for (const w of answer.split(/(?<= )/)) text(w)
  }
  calls.forEach((c, i) => deltas.push({ type: 'delta', text: '', tool_calls: [{ index: i, id: `call_${n}_${i}`, type: 'function', function: { name: c.name, arguments: '' } }] }))
  const pieces = calls.map(c => c.args.match(/[\s\S]{1,5}/g))
  for (let k = 0; pieces.some(p => k < p.length); k++) {
    pieces.forEach((p, index) => { if (k < p.length) deltas.push({ type: 'delta', text: '', tool_calls: [{ index, function: { arguments: p[k] } }] }) })
  }
  const completion = deltas.length
  return [...deltas, {
    type: 'done', finish_reason: calls.length ? 'tool_calls' : 'stop', cost_usd: 0.000123,
    usage: {
      prompt_tokens: 40, completion_tokens: completion, total_tokens: 40 + completion, prompt_tokens_details: { cached_tokens: 16 },
      ...(reasoningTokens ? { completion_tokens_details: { reasoning_tokens: reasoningTokens } } : {}),
    },
    completion_id: `chatcmpl-${n}`, system_fingerprint: 'fp_script',
  }]
}

/** A scripted gateway on every page of `context`: hello, open (scripted answers), cancel, ping. */
async function scriptedGateway (context, { chunkMs = 15 } = {}) {
  const gw = { connections: 0, opens: [] }
  await context.routeWebSocket(/\/v1\/ws$/, (ws) => {
    gw.connections++
    const timers = new Map()
    const send = f => ws.send(JSON.stringify(f))
    ws.onMessage((raw) => {
      const msg = JSON.parse(String(raw))
      if (msg.type === 'hello') {
        return send({ type: 'welcome', session: `s${gw.connections}`, user: 'demo', tier: 'pro', heartbeat_ms: 15000, limits: { max_streams: 32, max_frame_bytes: 1048576 }, resumed: [] })
      }
      if (msg.type === 'ping') return send({ type: 'pong', ts: msg.ts })
      if (msg.type === 'cancel') {
        clearInterval(timers.get(msg.id))
        return send({ type: 'error', id: msg.id, code: 'cancelled', message: 'cancelled by the client' })
      }
      if (msg.type !== 'open') return
      gw.opens.push(msg)
      const frames = scriptedAnswer(msg, gw.opens.length)
      send({ type: 'start', id: msg.id, model: msg.model })
      let seq = 0
      timers.set(msg.id, setInterval(() => {
        const f = frames.shift()
        if (!f) return clearInterval(timers.get(msg.id))
        send({ ...f, id: msg.id, ...(f.type === 'error' ? {} : { seq: ++seq }) })
      }, chunkMs))
    })
    ws.onClose(() => { for (const t of timers.values()) clearInterval(t) })
  })
  return gw
}

let browser
let gw
before(async () => {
  browser = await launchBrowser()
  await serveWeb(browser.context)
  gw = await scriptedGateway(browser.context, { chunkMs: 12 })
})
after(async () => { await browser?.close() })

test('demo: reasoning collapsed, tool calls with their arguments and the tool loop, a refusal, an upstream error', { timeout: 90_000 }, async () => {
  const { context } = browser
  const base = gw.opens.length
  const page = context.pages()[0] ?? await context.newPage()
  await page.goto(`${ORIGIN}/?token=scripted`)
  await waitFor(async () => (await page.textContent('#connection')) === 'open', { what: 'the socket chip to say open' })
  const msg = i => page.locator('.msg.assistant').nth(i)
  const finished = i => waitFor(async () => /stop|tool_calls|\$|upstream_error/.test((await msg(i).locator('.meta').textContent()) ?? ''), { what: `answer ${i} to finish` })
  const send = async (preset) => {
    await page.click(`.preset >> text="${preset}"`)
    await page.press('#prompt', 'Enter')
  }

  // reasoning, then text: the reasoning sits collapsed above the answer
  await send('Reasoning')
  await finished(0)
  const reasoning = msg(0).locator('details.reasoning')
  assert.equal(await reasoning.count(), 1)
  assert.equal(await reasoning.evaluate(d => d.open), false, 'collapsed')
  assert.match(await reasoning.locator('summary').textContent(), /^Reasoning · \d+\.\d s$/)
  assert.equal(await reasoning.locator('.reasoning-text').textContent(), Array.from({ length: 20 }, (_, k) => `step ${k} of thinking. `).join(''))
  assert.ok(await msg(0).locator('.reasoning-text').isHidden())
  assert.equal(await msg(0).locator('.bubble').textContent(), 'think0 it1 through2 first:3 why4 share5 one6 socket7 between8 tabs?9')
  assert.match(await msg(0).locator('.meta').textContent(), /20 reasoning/)
  await reasoning.locator('summary').click()
  assert.ok(await msg(0).locator('.reasoning-text').isVisible())

  // one tool call: shown with its name and indented arguments, run by the page, answered
  await send('Tool call')
  await waitFor(async () => (await page.locator('.msg.assistant').count()) === 3 && /stop/.test(await msg(2).locator('.meta').textContent()), { what: 'the tool loop to finish' })
  assert.equal(await msg(1).locator('.tool-name').textContent(), 'get_weather')
  assert.equal(await msg(1).locator('.tool-args').textContent(), '{\n  "city": "Paris"\n}')
  const callId = `call_${base + 2}_0`
  assert.equal(await msg(1).locator('.tool-id').textContent(), callId)
  const toolResult = (await msg(1).locator('.tool-result').textContent()).replace(/^→ /, '')
  assert.equal(JSON.parse(toolResult).city, 'Paris')
  assert.ok(await msg(1).locator('.bubble').isHidden(), 'a tool-call-only answer has no text bubble')
  assert.match(await msg(1).locator('.meta').textContent(), /tool_calls.*1 tool call/)
  assert.equal(await msg(2).locator('.bubble').textContent(), `The tool answered: ${toolResult}`)
  const followUp = gw.opens[base + 2]
  assert.deepEqual(followUp.params.tools.map(t => t.function.name), ['get_weather', 'get_time'])
  assert.deepEqual(followUp.messages.slice(-2), [
    { role: 'assistant', content: null, tool_calls: [{ id: callId, type: 'function', function: { name: 'get_weather', arguments: '{"city":"Paris"}' } }] },
    { role: 'tool', tool_call_id: callId, content: toolResult },
  ])

  // two parallel calls scripted by [[mock tools=2]]: shown, not run, no follow-up request
  await send('Parallel tool calls')
  await finished(3)
  assert.deepEqual(await msg(3).locator('.tool-name').allTextContents(), ['get_weather', 'get_time'])
  assert.deepEqual((await msg(3).locator('.tool-args').allTextContents()).map(a => JSON.parse(a)),
    [{ city: 'Paris', note: 'said "hi"' }, { city: 'Tokyo', note: 'said "hi"' }])
  assert.equal(await msg(3).locator('.tool-result.muted').count(), 2)
  assert.equal(gw.opens.length, base + 4)

  // a refusal, and an upstream error with what the upstream said
  await send('Refusal')
  await finished(4)
  assert.equal(await msg(4).locator('.refusal').textContent(), "Refused: I'm sorry, but I can't help with that.")
  await send('Upstream error')
  await finished(5)
  assert.equal(await msg(5).locator('.meta .err').textContent(),
    "upstream_error (HTTP 400, context_length_exceeded, param messages): This model's maximum context length is 8192 tokens")

  const dir = path.join(WEB_DIR, 'test-results')
  fs.mkdirSync(dir, { recursive: true })
  // tall enough for the whole conversation (it scrolls inside the page otherwise)
  await page.setViewportSize({ width: 1100, height: 2100 })
  await page.screenshot({ path: path.join(dir, 'demo-answers.png') })
  await page.close()
})

test('three tabs on one socket: each receives its reasoning and tool calls, parts and result exact', { timeout: 90_000 }, async () => {
  const { context } = browser
  const before = gw.connections
  const pages = await openTabs(context, `${ORIGIN}/?token=scripted`, 3)
  try {
    await waitShared(pages)
    const tools = [{ type: 'function', function: { name: 'lookup', parameters: { type: 'object', properties: {} } } }]
    for (const [i, page] of pages.entries()) {
      await startAnswer(page, 'tools', {
        model: 'deepseek-v3.2', params: { tools },
        messages: [{ role: 'user', content: `tab ${i} [[mock reasoning=6 tools=2]]` }],
      })
    }
    const answers = await waitAnswers(pages, 'tools')
    assert.equal(gw.connections - before, 1, 'one socket for the three tabs')
    for (const a of answers) {
      assert.equal(a.error, null)
      const open = gw.opens.find(o => o.id === a.id)
      const n = gw.opens.indexOf(open) + 1
      const script = scriptedAnswer(open, n)
      const want = script.filter(f => f.type === 'delta').flatMap(f => f.reasoning
        ? [{ type: 'reasoning', text: f.reasoning }]
        : f.tool_calls.map(c => ({ type: 'tool_call', index: c.index, ...(c.id ? { id: c.id, name: c.function.name } : {}), arguments: c.function.arguments })))
      assert.deepEqual(a.parts, want, `tab stream ${a.id}`)
      assert.deepEqual(a.result.toolCalls, [
        { id: `call_${n}_0`, type: 'function', function: { name: 'lookup', arguments: JSON.stringify({ city: 'Paris', note: 'said "hi"' }) } },
        { id: `call_${n}_1`, type: 'function', function: { name: 'lookup', arguments: JSON.stringify({ city: 'Tokyo', note: 'said "hi"' }) } },
      ])
      assert.equal(a.result.reasoning, Array.from({ length: 6 }, (_, k) => `step ${k} of thinking. `).join(''))
      assert.equal(a.result.finish_reason, 'tool_calls')
      assert.deepEqual(a.result.usage.completion_tokens_details, { reasoning_tokens: 6 })
      assert.equal(a.result.completion_id, `chatcmpl-${n}`)
    }
  } finally { for (const p of pages) await p.close() }
})

test('real gateway and mock upstream: four tabs on one socket each get reasoning and two tool calls', { timeout: 120_000 }, async () => {
  const stack = await startStack()
  const { context, close } = await launchBrowser()
  try {
    // the mock's tools= and reasoning= directives (issue 12): a mock without them fails here, loudly
    const probe = await fetch(`${stack.mock.url}/v1/chat/completions`, {
      method: 'POST', headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'm', messages: [{ role: 'user', content: 'probe [[mock tools=1 reasoning=1]]' }] }),
    })
    assert.ok(probe.ok, `the mock upstream refuses tools=/reasoning= (${probe.status})`)
    const user = userNamer('answers')('tools')
    const pages = await openTabs(context, demoUrl(stack.gateway.url, user), 4)
    await waitShared(pages)
    const tools = ['get_weather', 'get_time'].map(name => ({
      type: 'function',
      function: { name, parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] } },
    }))
    for (const [i, page] of pages.entries()) {
      await startAnswer(page, 'tools', {
        model: 'deepseek-v3.2', params: { tools },
        messages: [{ role: 'user', content: `Weather in Paris and Tokyo, tab ${i} [[mock reasoning=5 tools=2 delay_ms=30]]` }],
      })
    }
    const answers = await waitAnswers(pages, 'tools')
    for (const a of answers) {
      assert.equal(a.error, null, `${a.id}: ${JSON.stringify(a.error)}`)
      const types = a.parts.map(p => p.type)
      assert.deepEqual(types.slice(0, 5), Array(5).fill('reasoning'), `${a.id}: the reasoning first`)
      assert.ok(types.slice(5).every(x => x === 'tool_call') && types.length > 5 + 2, `${a.id}: then only tool-call fragments: ${types}`)
      const { result } = a
      assert.equal(result.finish_reason, 'tool_calls')
      assert.equal(result.text, '')
      assert.equal(result.reasoning, a.parts.filter(p => p.type === 'reasoning').map(p => p.text).join(''))
      assert.ok(result.reasoning.length > 0)
      assert.deepEqual(result.toolCalls.map(c => c.function.name), ['get_weather', 'get_time'])
      result.toolCalls.forEach((call, i) => {
        assert.match(call.id, new RegExp(`^call_.+_${i}$`))
        assert.equal(call.type, 'function')
        const fragments = a.parts.filter(p => p.type === 'tool_call' && p.index === i)
        assert.equal(fragments[0].id, call.id, 'the first fragment carries the id')
        assert.ok(fragments.slice(1).every(f => f.id === undefined && f.name === undefined), 'and only the first')
        assert.ok(fragments.filter(f => f.arguments !== '').length >= 2, 'arguments split over several chunks')
        assert.equal(typeof JSON.parse(call.function.arguments), 'object')
      })
      assert.equal(result.usage.total_tokens, result.usage.prompt_tokens + result.usage.completion_tokens)
      assert.equal(result.usage.completion_tokens_details?.reasoning_tokens, 5)
    }
    const stats = await stack.gateway.admin(user)
    assert.equal(stats.connections_total, 1, 'one socket for the four tabs')
  } finally {
    await close()
    await stack.stop()
  }
})
