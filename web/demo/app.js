// The demo chat: a real page on the shim. Its token comes from the gateway's dev mode
// (`/dev/token`), or from `?token=` (then `?user=` is ignored). `?user=` picks the demo user,
// `?tier=` the tier, `?model=` the preselected model, `?ws=` another gateway's socket URL.
// The preset buttons use the mock upstream's directives (`[[mock ...]]`, src/mock.rs), so each
// shape of answer (reasoning, tool calls, a refusal, an upstream error) can be seen offline.
import { connect } from '../src/index.js'

const params = new URLSearchParams(location.search)
const user = params.get('user') || 'demo'
const tier = params.get('tier') || 'pro'
const fixedToken = params.get('token')

const $ = (id) => document.getElementById(id)
const el = {
  conversation: $('conversation'), empty: $('empty'), banner: $('banner'),
  form: $('composer'), prompt: $('prompt'), model: $('model'), send: $('send'), stop: $('stop'), hint: $('hint'),
  role: $('role'), chipRole: $('chip-role'), connection: $('connection'), chipConn: $('chip-conn'),
  tabs: $('tabs'), user: $('user'), tabId: $('tab-id'), tools: $('tools'), presets: $('presets'),
}

/**
 * The demo's tools: offered to the model when "demo tools" is ticked, and run here, in the
 * page, when it calls them (made-up answers: this is a demo, not a weather service).
 */
const TOOLS = {
  get_weather: {
    description: 'The current weather in a city',
    run: ({ city }) => {
      const h = [...String(city)].reduce((a, c) => a + c.codePointAt(0), 0)
      return { city, temperature_c: 4 + (h % 24), conditions: ['sunny', 'cloudy', 'light rain', 'windy'][h % 4] }
    },
  },
  get_time: {
    description: 'The current time in a city',
    run: ({ city }) => ({ city, utc: new Date().toISOString().slice(11, 16) }),
  },
}
const toolDefinitions = Object.entries(TOOLS).map(([name, t]) => ({
  type: 'function',
  function: {
    name,
    description: t.description,
    parameters: { type: 'object', properties: { city: { type: 'string', description: 'a city name' } }, required: ['city'] },
  },
}))
/** A model that keeps calling tools gets its answers this many times per question, then we stop. */
const MAX_TOOL_ROUNDS = 3

/** The presets: what each puts in the composer, and whether it ticks "demo tools". */
const PRESETS = [
  { label: 'Tool call', tools: true, prompt: 'What is the weather in Paris right now?' },
  { label: 'Parallel tool calls', tools: true, prompt: 'Weather and time in Paris and Tokyo, please. [[mock tools=2 delay_ms=40]]' },
  { label: 'Reasoning', tools: false, prompt: 'Think it through first: why share one socket between tabs? [[mock reasoning=20 chunks=24 delay_ms=60]]' },
  { label: 'Refusal', tools: false, prompt: 'Ask for something the model must refuse. [[mock refusal=1 delay_ms=40]]' },
  {
    label: 'Upstream error', tools: false,
    prompt: 'A prompt too long for the model [[mock fail=400 fail_type=invalid_request_error fail_code=context_length_exceeded fail_param=messages]]',
  },
]

function banner (text, kind = 'warn') {
  el.banner.hidden = !text
  el.banner.textContent = text || ''
  el.banner.dataset.kind = kind
}

async function devToken () {
  let res
  try {
    res = await fetch(`/dev/token?user=${encodeURIComponent(user)}&tier=${encodeURIComponent(tier)}`)
  } catch (err) {
    banner('Cannot reach the gateway for a demo token; retrying…')
    throw err
  }
  if (!res.ok) {
    banner('No demo token: this gateway is not in dev mode. Open the page with ?token=<a JWT for this gateway>.', 'error')
    throw new Error(`/dev/token answered ${res.status}`)
  }
  banner('')
  return (await res.json()).token
}

// `standby=1`: hold a standby connection (option `standby`, off by default)
const mux = connect({ url: params.get('ws') || '/v1/ws', token: fixedToken || devToken, standby: params.get('standby') === '1' })
// for the browser tests and the curious: the page's one handle on the shared socket
window.muxgateDemo = { mux }

if (params.get('model')) {
  const wanted = params.get('model')
  if (![...el.model.options].some(o => o.value === wanted)) el.model.add(new Option(wanted))
  el.model.value = wanted
}

/** @type {Array<Record<string, unknown>>} the conversation as chat-completions messages */
const history = []
let current = null

mux.on('status', (s) => {
  el.role.textContent = s.role
  el.chipRole.dataset.state = s.role
  el.connection.textContent = s.connection
  el.chipConn.dataset.state = s.connection
  el.tabs.textContent = String(s.tabs)
  el.user.textContent = s.user ? `${s.user} · ${s.tier}` : '–'
  el.tabId.textContent = s.tabId
  if (current && current.stream) {
    const q = s.queue.find(x => x.id === current.stream.id)
    current.setQueued(q ? q.position : null)
  }
})
mux.on('error', (err) => banner(`Gateway: ${err.message} (${err.code})`, 'error'))

function addMessage (role, text) {
  el.empty.hidden = true
  const wrap = document.createElement('div')
  wrap.className = `msg ${role}`
  const bubble = document.createElement('div')
  bubble.className = 'bubble'
  bubble.textContent = text
  const meta = document.createElement('div')
  meta.className = 'meta'
  wrap.append(bubble, meta)
  el.conversation.append(wrap)
  wrap.scrollIntoView({ block: 'end' })
  return { wrap, bubble, meta }
}

function metaItem (meta, text, cls) {
  const span = document.createElement('span')
  span.textContent = text
  if (cls) span.className = cls
  meta.append(span)
}

function setBusy (busy) {
  el.send.disabled = busy
  el.stop.hidden = !busy
  el.hint.textContent = busy ? 'streaming…' : ''
}

/** An element with a class and optional text. */
function node (tag, cls, text) {
  const e = document.createElement(tag)
  if (cls) e.className = cls
  if (text !== undefined) e.textContent = text
  return e
}

/** Arguments JSON, indented when it parses (a model may write invalid JSON: shown as is). */
function pretty (json) {
  try {
    return JSON.stringify(JSON.parse(json), null, 2)
  } catch {
    return json
  }
}

/**
 * Shows one streamed answer in `view` as its parts arrive: reasoning in a collapsed
 * <details> above the text, a refusal in its own box, each tool call as a card (its name,
 * then its arguments: raw while they stream, indented once complete).
 */
function answerView (view) {
  const since = performance.now()
  let reasoning = null
  let refusal = null
  let tools = null
  /** @type {Map<number, {card: HTMLElement, name: HTMLElement, args: HTMLElement, raw: string}>} */
  const calls = new Map()
  view.bubble.textContent = ''
  view.bubble.hidden = true
  const thoughtFor = () => `Reasoning · ${((reasoning.last - since) / 1000).toFixed(1)} s`
  return {
    part (part) {
      if (part.type === 'reasoning') {
        if (!reasoning) {
          const details = node('details', 'reasoning')
          const summary = node('summary', null, 'Thinking…')
          const body = node('div', 'reasoning-text')
          details.append(summary, body)
          view.wrap.insertBefore(details, view.bubble)
          reasoning = { details, summary, body, last: since }
        }
        reasoning.body.textContent += part.text
        reasoning.last = performance.now()
      } else if (part.type === 'refusal') {
        if (!refusal) {
          refusal = node('div', 'refusal')
          refusal.append(node('strong', null, 'Refused: '), node('span'))
          view.wrap.insertBefore(refusal, view.meta)
        }
        refusal.lastChild.textContent += part.text
      } else if (part.type === 'text') {
        if (reasoning) reasoning.summary.textContent = thoughtFor()
        view.bubble.hidden = false
        view.bubble.textContent += part.text
      } else if (part.type === 'tool_call') {
        if (reasoning) reasoning.summary.textContent = thoughtFor()
        if (!tools) {
          tools = node('div', 'tool-calls')
          view.wrap.insertBefore(tools, view.meta)
        }
        let call = calls.get(part.index)
        if (!call) {
          const card = node('div', 'tool-call')
          const head = node('div', 'tool-head')
          const name = node('code', 'tool-name', part.name ?? '…')
          head.append(node('span', 'tool-icon', 'ƒ'), name, node('span', 'tool-id', part.id ?? ''))
          const args = node('pre', 'tool-args')
          card.append(head, args)
          tools.append(card)
          call = { card, name, args, raw: '' }
          calls.set(part.index, call)
        }
        if (part.name) call.name.textContent = part.name
        call.raw += part.arguments
        call.args.textContent = call.raw
      }
    },
    /** The answer is complete (or stopped): indent the arguments, settle the reasoning's summary. */
    end () {
      if (reasoning) reasoning.summary.textContent = thoughtFor()
      for (const call of calls.values()) call.args.textContent = pretty(call.raw)
    },
    /** Shows what became of a tool call, under it. */
    toolNote (index, text, cls = 'tool-result') {
      calls.get(index)?.card.append(node('pre', cls, text))
    },
    empty () {
      return view.bubble.hidden && !reasoning && !refusal && calls.size === 0
    },
  }
}

/** One line of an error for the meta row: the muxgate code, and what the upstream said. */
function describeError (err) {
  const said = [err.status && `HTTP ${err.status}`, err.upstream?.code, err.upstream?.param && `param ${err.upstream.param}`]
  const detail = said.filter(Boolean).join(', ')
  return `${err.code}${detail ? ` (${detail})` : ''}: ${err.message}`
}

async function ask (content) {
  history.push({ role: 'user', content })
  addMessage('user', content)
  const offerTools = el.tools.checked
  // `[[mock tools=N]]` answers with N calls every time: show them, but do not loop on them.
  const scripted = /\[\[mock[^\]]*\btools=/.test(content)
  setBusy(true)
  try {
    for (let round = 1; ; round++) {
      const notRun = !offerTools ? 'not run: the page offered no tools'
        : scripted ? 'not run: scripted by [[mock tools=N]], which would only call them again'
          : round > MAX_TOOL_ROUNDS ? `not run: ${MAX_TOOL_ROUNDS} rounds of tool calls for one question`
            : null
      if (!(await answer(offerTools, notRun))) break
    }
  } finally {
    current = null
    setBusy(false)
    el.prompt.focus()
  }
}

/**
 * Streams one assistant message. When it calls tools and `notRun` is null, runs them here,
 * adds their results to `history` and returns true: the caller asks the model again.
 */
async function answer (offerTools, notRun) {
  const model = el.model.value
  const view = addMessage('assistant', 'waiting for the model…')
  view.wrap.classList.add('waiting')
  const request = { model, messages: history.slice() }
  if (offerTools) request.params = { tools: toolDefinitions }
  const stream = mux.chat(request)
  const started = performance.now()
  let shown = null
  current = {
    stream,
    setQueued (position) {
      if (position !== null && !shown) view.bubble.textContent = `queued for an upstream slot: #${position}`
    },
  }
  const showOnly = (text) => {
    view.bubble.hidden = false
    view.bubble.textContent = text
  }
  try {
    for await (const part of stream.parts()) {
      if (!shown) {
        view.wrap.classList.remove('waiting')
        view.wrap.classList.add('streaming')
        shown = answerView(view)
      }
      shown.part(part)
      view.wrap.scrollIntoView({ block: 'end' })
    }
    view.wrap.classList.remove('streaming', 'waiting')
    shown?.end()
    let result
    try {
      result = await stream.result
    } catch (err) {
      if (err.code !== 'cancelled') throw err
      if (!shown || shown.empty()) showOnly('(stopped before the first token)')
      metaItem(view.meta, 'stopped', 'stopped')
      if (shown && !view.bubble.hidden) history.push({ role: 'assistant', content: view.bubble.textContent })
      return false
    }
    const { usage, finish_reason: finish, cost_usd: cost, toolCalls } = result
    metaItem(view.meta, result.model ?? model)
    if (finish) metaItem(view.meta, finish)
    if (usage) metaItem(view.meta, `${usage.prompt_tokens} in · ${usage.completion_tokens} out`)
    const cached = usage?.prompt_tokens_details?.cached_tokens
    if (cached) metaItem(view.meta, `${cached} cached`)
    const thinking = usage?.completion_tokens_details?.reasoning_tokens
    if (thinking) metaItem(view.meta, `${thinking} reasoning`)
    if (toolCalls.length) metaItem(view.meta, `${toolCalls.length} tool call${toolCalls.length > 1 ? 's' : ''}`)
    if (typeof cost === 'number') metaItem(view.meta, `$${cost.toFixed(6)}`)
    metaItem(view.meta, `${((performance.now() - started) / 1000).toFixed(1)} s`)
    if (!shown || shown.empty()) showOnly('(empty answer)')
    if (toolCalls.length && !notRun) {
      history.push({ role: 'assistant', content: result.text || null, tool_calls: toolCalls })
      toolCalls.forEach((call, i) => {
        const output = runTool(call)
        shown.toolNote(i, `→ ${output}`)
        history.push({ role: 'tool', tool_call_id: call.id, content: output })
      })
      return true
    }
    toolCalls.forEach((_, i) => shown.toolNote(i, notRun, 'tool-result muted'))
    // calls nobody answers stay out of the history: a request must answer every call it lists
    const said = result.text || result.refusal
    if (said) history.push({ role: 'assistant', content: said })
    return false
  } catch (err) {
    view.wrap.classList.remove('streaming', 'waiting')
    shown?.end()
    if (!shown || shown.empty()) showOnly('(no answer)')
    metaItem(view.meta, describeError(err), 'err')
    if (shown && !view.bubble.hidden) history.push({ role: 'assistant', content: view.bubble.textContent })
    return false
  }
}

/** Runs one of the demo's tools: the tool message's content (its result, or why it failed). */
function runTool (call) {
  const tool = TOOLS[call.function.name]
  if (!tool) return JSON.stringify({ error: `no tool named ${call.function.name}` })
  let args
  try {
    args = JSON.parse(call.function.arguments || '{}')
  } catch {
    return JSON.stringify({ error: 'the arguments are not valid JSON' })
  }
  return JSON.stringify(tool.run(args))
}

el.form.addEventListener('submit', (event) => {
  event.preventDefault()
  const content = el.prompt.value.trim()
  if (!content || current) return
  el.prompt.value = ''
  autosize()
  ask(content)
})
el.prompt.addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
    event.preventDefault()
    el.form.requestSubmit()
  }
})
function autosize () {
  el.prompt.style.height = 'auto'
  el.prompt.style.height = `${Math.min(el.prompt.scrollHeight, 200)}px`
}
el.prompt.addEventListener('input', autosize)
el.stop.addEventListener('click', () => current?.stream.cancel())
$('open-tab').addEventListener('click', () => window.open(location.href, '_blank', 'noopener'))
$('example').addEventListener('click', () => {
  el.prompt.value = 'Explain in a few sentences why a browser stalls the 7th SSE stream to one host, and how one shared WebSocket avoids it.'
  autosize()
  el.prompt.focus()
})
for (const preset of PRESETS) {
  const button = node('button', 'preset', preset.label)
  button.type = 'button'
  button.title = preset.prompt
  button.addEventListener('click', () => {
    el.prompt.value = preset.prompt
    el.tools.checked = preset.tools
    autosize()
    el.prompt.focus()
  })
  el.presets.append(button)
}
el.prompt.focus()
