import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// Server-sent events over a URLSession data delegate. (`URLSession.bytes(for:)` would be simpler, but
/// Foundation on Linux does not have it; a delegate works on every platform.)
///
/// Each `data:` line is one chunk of JSON; `data: [DONE]` ends the stream; a `{"error": ...}` event
/// ends it with that error. A non-200 answer ends it with the error body the server sent.
final class EventStream: NSObject, URLSessionDataDelegate, @unchecked Sendable {
    // Only touched from the session's serial delegate queue, after start().
    private let continuation: AsyncThrowingStream<ChatChunk, Error>.Continuation
    private var buffer = Data()
    private var status = 0
    private var errorBody = Data()
    private var finished = false
    private var session: URLSession?

    init(continuation: AsyncThrowingStream<ChatChunk, Error>.Continuation) {
        self.continuation = continuation
    }

    func start(_ request: URLRequest, timeout: TimeInterval) {
        let config = URLSessionConfiguration.default
        config.timeoutIntervalForRequest = timeout
        let queue = OperationQueue()
        queue.maxConcurrentOperationCount = 1
        // The session keeps its delegate (self) alive until it is invalidated below.
        let session = URLSession(configuration: config, delegate: self, delegateQueue: queue)
        self.session = session
        let task = session.dataTask(with: request)
        continuation.onTermination = { @Sendable _ in
            task.cancel()  // the consumer stopped early: hang up, so the server frees the slot
        }
        task.resume()
    }

    func urlSession(_ session: URLSession, dataTask: URLSessionDataTask, didReceive response: URLResponse,
                    completionHandler: @escaping (URLSession.ResponseDisposition) -> Void) {
        status = (response as? HTTPURLResponse)?.statusCode ?? 0
        completionHandler(.allow)
    }

    func urlSession(_ session: URLSession, dataTask: URLSessionDataTask, didReceive data: Data) {
        if status != 200 {
            errorBody.append(data)
            return
        }
        buffer.append(data)
        while let newline = buffer.firstIndex(of: UInt8(ascii: "\n")) {
            let line = buffer[buffer.startIndex..<newline]
            buffer = Data(buffer[buffer.index(after: newline)...])
            handle(line: String(decoding: line, as: UTF8.self))
            if finished {
                dataTask.cancel()
                return
            }
        }
    }

    func urlSession(_ session: URLSession, task: URLSessionTask, didCompleteWithError error: Error?) {
        defer { session.finishTasksAndInvalidate() }
        if finished { return }
        if let error {
            finish(throwing: ApplelmError.transport(String(describing: error)))
        } else if status != 200 {
            finish(throwing: ApplelmError.api(APIError.from(status: status, body: errorBody)))
        } else {
            finish(throwing: ApplelmError.invalidResponse("the stream ended without data: [DONE]"))
        }
    }

    private func handle(line: String) {
        let line = line.hasSuffix("\r") ? String(line.dropLast()) : line
        guard line.hasPrefix("data:") else { return }  // comments, event names, blank separators
        var payload = line.dropFirst(5)
        if payload.first == " " { payload = payload.dropFirst() }
        if payload == "[DONE]" {
            finish(throwing: nil)
            return
        }
        let data = Data(payload.utf8)
        if let failure = try? JSONDecoder().decode(ErrorProbe.self, from: data), failure.error != nil {
            finish(throwing: ApplelmError.api(APIError.from(status: 500, body: data)))
            return
        }
        do {
            continuation.yield(try Coding.decoder.decode(ChatChunk.self, from: data))
        } catch {
            finish(throwing: ApplelmError.invalidResponse("bad stream chunk: \(error)"))
        }
    }

    private func finish(throwing error: Error?) {
        guard !finished else { return }
        finished = true
        if let error { continuation.finish(throwing: error) } else { continuation.finish() }
    }

    private struct ErrorProbe: Decodable {
        struct Inner: Decodable { var message: String? }
        var error: Inner?
    }
}
