import Foundation

/// One chat message. `role` is "system", "user", "assistant" (also "developer", "tool").
public struct ChatMessage: Codable, Sendable, Equatable {
    public var role: String
    public var content: String

    public init(role: String, content: String) {
        self.role = role
        self.content = content
    }

    public static func system(_ text: String) -> ChatMessage { ChatMessage(role: "system", content: text) }
    public static func user(_ text: String) -> ChatMessage { ChatMessage(role: "user", content: text) }
    public static func assistant(_ text: String) -> ChatMessage { ChatMessage(role: "assistant", content: text) }
}

/// A chat request. Unset options use the server's defaults (temperature 1, max tokens up to the context).
public struct ChatRequest: Encodable, Sendable {
    public var model: String
    public var messages: [ChatMessage]
    public var maxCompletionTokens: Int?
    public var temperature: Double?
    public var topP: Double?
    public var seed: Int?
    public var stop: [String]?
    /// Extension of this server: keep generating past the end-of-sequence token (benchmarks, tests).
    public var ignoreEos: Bool?
    var stream: Bool?
    var streamOptions: StreamOptions?

    struct StreamOptions: Encodable, Sendable {
        var includeUsage: Bool
    }

    public init(model: String = "default", messages: [ChatMessage], maxCompletionTokens: Int? = nil,
                temperature: Double? = nil, topP: Double? = nil, seed: Int? = nil, stop: [String]? = nil,
                ignoreEos: Bool? = nil) {
        self.model = model
        self.messages = messages
        self.maxCompletionTokens = maxCompletionTokens
        self.temperature = temperature
        self.topP = topP
        self.seed = seed
        self.stop = stop
        self.ignoreEos = ignoreEos
    }
}

public struct Usage: Decodable, Sendable, Equatable {
    public var promptTokens: Int
    public var completionTokens: Int
    public var totalTokens: Int
}

/// A whole (non-streamed) chat completion.
public struct ChatCompletion: Decodable, Sendable {
    public struct Choice: Decodable, Sendable {
        public var index: Int
        public var message: ChatMessage
        /// "stop" (end of sequence or a stop string) or "length" (max tokens or the context window).
        public var finishReason: String?
    }

    public var id: String
    public var created: Int
    public var model: String
    public var choices: [Choice]
    public var usage: Usage

    /// The first choice's text.
    public var text: String { choices.first?.message.content ?? "" }
}

/// One streamed piece of a chat completion.
public struct ChatChunk: Decodable, Sendable {
    public struct Delta: Decodable, Sendable {
        public var role: String?
        public var content: String?
    }

    public struct Choice: Decodable, Sendable {
        public var index: Int
        public var delta: Delta
        public var finishReason: String?
    }

    public var id: String
    public var created: Int
    public var model: String
    public var choices: [Choice]
    /// Only on the last chunk, and only when usage was asked for.
    public var usage: Usage?

    /// The new text in this chunk ("" when none).
    public var text: String { choices.first?.delta.content ?? "" }
    public var finishReason: String? { choices.first?.finishReason }
}

public struct Model: Decodable, Sendable, Equatable {
    public var id: String
    public var created: Int
    public var ownedBy: String
}

/// The server's readiness: status "ok", with the requests now decoding (active) and waiting (queued).
public struct Health: Decodable, Sendable {
    public var status: String
    public var model: String?
    public var active: Int?
    public var queued: Int?
}

struct ModelList: Decodable {
    var data: [Model]
}
