import ApplelmClient
import Foundation
import XCTest

/// Runs against a live server: tests/test_server_swift.py starts `python -m applelm.server` on a tiny
/// model and sets APPLELM_SERVER_URL (and APPLELM_API_KEY). Without it, every test is skipped.
final class ApplelmClientTests: XCTestCase {
    var client: ApplelmClient!
    var url: URL!

    override func setUpWithError() throws {
        let env = ProcessInfo.processInfo.environment
        guard let base = env["APPLELM_SERVER_URL"], let url = URL(string: base) else {
            throw XCTSkip("APPLELM_SERVER_URL is not set (run through tests/test_server_swift.py)")
        }
        self.url = url
        client = ApplelmClient(baseURL: url, apiKey: env["APPLELM_API_KEY"], timeout: 120)
    }

    func ask(_ text: String, maxTokens: Int = 8, ignoreEos: Bool = true) -> ChatRequest {
        ChatRequest(messages: [.user(text)], maxCompletionTokens: maxTokens, temperature: 0, ignoreEos: ignoreEos)
    }

    func testListModels() async throws {
        let models = try await client.models()
        XCTAssertEqual(models.count, 1)
        XCTAssertEqual(models.first?.ownedBy, "applelm")
    }

    func testChatUsageAndLength() async throws {
        let reply = try await client.chat(ask("hello", maxTokens: 6))
        XCTAssertEqual(reply.choices.first?.finishReason, "length")
        XCTAssertEqual(reply.usage.completionTokens, 6)
        XCTAssertEqual(reply.usage.totalTokens, reply.usage.promptTokens + 6)
        XCTAssertEqual(reply.choices.first?.message.role, "assistant")
    }

    func testStreamEqualsWholeReply() async throws {
        let whole = try await client.chat(ask("stream me", maxTokens: 12))
        var text = ""
        var finish: String?
        var usage: Usage?
        for try await chunk in client.chatStream(ask("stream me", maxTokens: 12), includeUsage: true) {
            text += chunk.text
            finish = chunk.finishReason ?? finish
            usage = chunk.usage ?? usage
        }
        XCTAssertEqual(text, whole.text)
        XCTAssertEqual(finish, "length")
        XCTAssertEqual(usage, whole.usage)
    }

    func testSeedIsReproducible() async throws {
        var req = ask("seeded", maxTokens: 10)
        req.temperature = 1.0
        req.seed = 42
        let a = try await client.chat(req).text
        let b = try await client.chat(req).text
        XCTAssertEqual(a, b)
    }

    func testTypedErrors() async throws {
        do {
            _ = try await client.chat(ChatRequest(model: "no-such-model", messages: [.user("hi")]))
            XCTFail("expected an error")
        } catch let error as ApplelmError {
            XCTAssertEqual(error.apiError?.kind, .notFound)
            XCTAssertEqual(error.apiError?.code, "model_not_found")
        }
        do {
            _ = try await client.chat(ChatRequest(messages: [.user("hi")], temperature: 7))
            XCTFail("expected an error")
        } catch let error as ApplelmError {
            XCTAssertEqual(error.apiError?.kind, .badRequest)
            XCTAssertEqual(error.apiError?.param, "temperature")
        }
        do {  // errors before a stream starts come through the stream
            for try await _ in client.chatStream(ChatRequest(messages: [])) {}
            XCTFail("expected an error")
        } catch let error as ApplelmError {
            XCTAssertEqual(error.apiError?.status, 400)
        }
        let wrongKey = ApplelmClient(baseURL: url, apiKey: "wrong-key")
        do {
            _ = try await wrongKey.models()
            XCTFail("expected an error")
        } catch let error as ApplelmError {
            XCTAssertEqual(error.apiError?.kind, .unauthorized)
        }
        let nobody = ApplelmClient(baseURL: URL(string: "http://127.0.0.1:9")!)
        do {
            _ = try await nobody.models()
            XCTFail("expected an error")
        } catch ApplelmError.transport {
        }
    }

    func testLeavingAStreamCancelsTheGeneration() async throws {
        var seen = 0
        for try await chunk in client.chatStream(ask("go on", maxTokens: 30000)) where !chunk.text.isEmpty {
            seen += 1
            if seen == 3 { break }
        }
        XCTAssertEqual(seen, 3)
        let deadline = Date().addingTimeInterval(10)
        var active = -1
        while Date() < deadline {
            active = try await client.health().active ?? -1
            if active == 0 { break }
            try await Task.sleep(nanoseconds: 20_000_000)
        }
        XCTAssertEqual(active, 0, "the server still generates for a stream the client left")
    }
}
