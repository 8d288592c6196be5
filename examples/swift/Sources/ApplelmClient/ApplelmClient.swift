import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking  // URLSession on Linux
#endif

/// A client for an applelm server (`python -m applelm.server`), or any OpenAI-compatible chat API.
///
///     let client = ApplelmClient(baseURL: URL(string: "http://127.0.0.1:8080")!)
///     let reply = try await client.chat(ChatRequest(messages: [.user("Hello")]))
///     for try await chunk in client.chatStream(ChatRequest(messages: [.user("Hello")])) {
///         print(chunk.text, terminator: "")
///     }
public struct ApplelmClient: Sendable {
    public let baseURL: URL
    public let apiKey: String?
    public let timeout: TimeInterval

    /// `baseURL` is the server root (the client adds `/v1/...`); `apiKey` is sent as a Bearer token.
    public init(baseURL: URL, apiKey: String? = nil, timeout: TimeInterval = 600) {
        self.baseURL = baseURL
        self.apiKey = apiKey
        self.timeout = timeout
    }

    /// The models the server serves.
    public func models() async throws -> [Model] {
        try await send(request("GET", "v1/models"), as: ModelList.self).data
    }

    /// Readiness and load (`GET /health`); throws `.api` with status 503 while the model loads.
    public func health() async throws -> Health {
        try await send(request("GET", "health"), as: Health.self)
    }

    /// A whole chat completion.
    public func chat(_ chat: ChatRequest) async throws -> ChatCompletion {
        var body = chat
        body.stream = nil
        body.streamOptions = nil
        return try await send(try request("POST", "v1/chat/completions", body: body), as: ChatCompletion.self)
    }

    /// A chat completion as it is generated. With `includeUsage`, the last chunk carries token counts.
    /// Stopping the iteration early (break, task cancellation) cancels the request and the server
    /// stops generating for it.
    public func chatStream(_ chat: ChatRequest, includeUsage: Bool = false) -> AsyncThrowingStream<ChatChunk, Error> {
        var body = chat
        body.stream = true
        body.streamOptions = includeUsage ? .init(includeUsage: true) : nil
        let urlRequest: URLRequest
        do {
            urlRequest = try request("POST", "v1/chat/completions", body: body)
        } catch {
            return AsyncThrowingStream { $0.finish(throwing: error) }
        }
        return AsyncThrowingStream { continuation in
            let stream = EventStream(continuation: continuation)
            stream.start(urlRequest, timeout: timeout)
        }
    }

    // MARK: - plumbing

    func request(_ method: String, _ path: String) -> URLRequest {
        var req = URLRequest(url: baseURL.appendingPathComponent(path))
        req.httpMethod = method
        req.timeoutInterval = timeout
        if let apiKey { req.setValue("Bearer \(apiKey)", forHTTPHeaderField: "Authorization") }
        return req
    }

    func request<Body: Encodable>(_ method: String, _ path: String, body: Body) throws -> URLRequest {
        var req = request(method, path)
        req.setValue("application/json", forHTTPHeaderField: "Content-Type")
        req.httpBody = try Coding.encoder.encode(body)
        return req
    }

    func send<T: Decodable>(_ req: URLRequest, as type: T.Type) async throws -> T {
        let data: Data
        let response: URLResponse
        do {
            (data, response) = try await URLSession.shared.data(for: req)
        } catch {
            throw ApplelmError.transport(String(describing: error))
        }
        guard let http = response as? HTTPURLResponse else {
            throw ApplelmError.invalidResponse("not an HTTP response")
        }
        guard (200..<300).contains(http.statusCode) else {
            throw ApplelmError.api(APIError.from(status: http.statusCode, body: data))
        }
        do {
            return try Coding.decoder.decode(T.self, from: data)
        } catch {
            throw ApplelmError.invalidResponse("\(T.self): \(error)")
        }
    }
}

enum Coding {
    static var encoder: JSONEncoder {
        let e = JSONEncoder()
        e.keyEncodingStrategy = .convertToSnakeCase
        return e
    }

    static var decoder: JSONDecoder {
        let d = JSONDecoder()
        d.keyDecodingStrategy = .convertFromSnakeCase
        return d
    }
}
