// The demo page as a person uses it: type, watch the answer stream, stop one, open a tab.
// Leaves a screenshot at web/test-results/demo.png.
import { after, before, test } from 'node:test'
import assert from 'node:assert/strict'
import fs from 'node:fs'
import path from 'node:path'
import { expectedText, launchBrowser, mockPrompt, startStack, waitFor, WEB_DIR } from './harness.js'

let stack
before(async () => { stack = await startStack() })
after(async () => { await stack?.stop() })

test('demo page: prompt, streamed answer, stop, role and shared tab count', { timeout: 120_000 }, async () => {
  const user = `demo-${process.pid}`
  const { context, close } = await launchBrowser()
  try {
    const page = context.pages()[0] ?? await context.newPage()
    await page.goto(`${stack.gateway.url}/?user=${user}`)
    await waitFor(async () => (await page.textContent('#connection')) === 'open', { what: 'the socket chip to say open' })
    assert.equal(await page.textContent('#role'), 'leader')
    assert.equal(await page.textContent('#tabs'), '1')
    assert.equal(await page.textContent('#user'), `${user} · pro`)

    // a second tab joins the same socket, and both pages say so
    const second = await context.newPage()
    await second.goto(`${stack.gateway.url}/?user=${user}`)
    await waitFor(async () => (await second.textContent('#role')) === 'follower' &&
      (await second.textContent('#tabs')) === '2' && (await page.textContent('#tabs')) === '2', { what: 'two tabs on one socket' })

    // an exact answer, typed and sent with Enter, from the follower tab
    const prompt = mockPrompt('Which words does the mock know?', { chunks: 12, delayMs: 40 })
    await second.fill('#prompt', prompt)
    await second.press('#prompt', 'Enter')
    await waitFor(async () => (await second.locator('.msg.assistant .meta').first().textContent()).includes('stop'), { what: 'the answer to finish' })
    assert.equal(await second.locator('.msg.assistant .bubble').first().textContent(), expectedText(prompt, 12))
    assert.equal(await second.locator('.msg.user .bubble').first().textContent(), prompt)
    assert.ok(await second.isHidden('#stop'))

    // a long answer, stopped halfway with the Stop button: its upstream request is aborted
    const before = await stack.mock.stats()
    await second.fill('#prompt', mockPrompt('Now something long', { chunks: 400, delayMs: 30 }))
    await second.click('#send')
    await waitFor(async () => ((await second.locator('.msg.assistant .bubble').nth(1).textContent()) ?? '').split(' ').length > 5, { what: 'the long answer to start' })
    assert.ok(await second.isVisible('#stop'))
    await second.click('#stop')
    await waitFor(async () => (await second.locator('.msg.assistant .meta').nth(1).textContent()).includes('stopped'), { what: 'the answer to show it was stopped' })
    await waitFor(async () => (await stack.mock.stats()).aborted === before.aborted + 1, { what: 'the upstream request to be aborted' })

    // the readable prose answer of the zero-config demo, in the leader tab
    await page.fill('#prompt', 'Explain why one WebSocket beats six SSE connections.')
    await page.press('#prompt', 'Enter')
    await waitFor(async () => ((await page.locator('.msg.assistant .meta').first().textContent()) ?? '').includes('$'), { what: 'the prose answer to finish with its cost' })
    const prose = await page.locator('.msg.assistant .bubble').first().textContent()
    assert.ok(prose.split(' ').length > 10, `a real answer: ${prose}`)

    const dir = path.join(WEB_DIR, 'test-results')
    fs.mkdirSync(dir, { recursive: true })
    await second.screenshot({ path: path.join(dir, 'demo.png') })
    await page.screenshot({ path: path.join(dir, 'demo-leader.png') })
  } finally { await close() }
})
