import Foundation

/// Errors from `ApplelmClient`: the server's OpenAI error body when it sent one, typed by status.
public enum ApplelmError: Error, Sendable, CustomStringConvertible {
    /// The server answered with an error: HTTP status and its `{"error": {...}}` body.
    case api(APIError)
    /// The server's answer could not be understood.
    case invalidResponse(String)
    /// The request never got an answer (connection refused, timeout, cancelled, ...).
    case transport(String)

    public var description: String {
        switch self {
        case .api(let e): return "HTTP \(e.status): \(e.message)"
        case .invalidResponse(let why): return "invalid response: \(why)"
        case .transport(let why): return "transport error: \(why)"
        }
    }

    /// The API error, if the server sent one.
    public var apiError: APIError? {
        if case .api(let e) = self { return e }
        return nil
    }
}

/// The OpenAI error body: `{"error": {"message", "type", "param", "code"}}` and the HTTP status.
public struct APIError: Error, Sendable, Equatable {
    public enum Kind: Sendable, Equatable {
        case badRequest, unauthorized, notFound, methodNotAllowed, payloadTooLarge, queueFull,
             serverError, unavailable, other
    }

    public var status: Int
    public var message: String
    public var type: String?
    public var code: String?
    public var param: String?

    public var kind: Kind {
        switch status {
        case 400: return .badRequest
        case 401: return .unauthorized
        case 404: return .notFound
        case 405: return .methodNotAllowed
        case 413: return .payloadTooLarge
        case 429: return .queueFull
        case 503: return .unavailable
        case 500...599: return .serverError
        default: return .other
        }
    }

    /// Parse an error body; falls back to the raw text when it is not the OpenAI shape.
    static func from(status: Int, body: Data) -> APIError {
        struct Envelope: Decodable {
            struct Inner: Decodable {
                var message: String
                var type: String?
                var code: String?
                var param: String?
            }
            var error: Inner
        }
        if let env = try? JSONDecoder().decode(Envelope.self, from: body) {
            return APIError(status: status, message: env.error.message, type: env.error.type,
                            code: env.error.code, param: env.error.param)
        }
        let text = String(decoding: body.prefix(500), as: UTF8.self)
        return APIError(status: status, message: text.isEmpty ? "HTTP \(status)" : text)
    }
}
