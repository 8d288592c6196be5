// applelm-chat: stream one chat reply from an applelm server.
//
//     APPLELM_SERVER_URL=http://127.0.0.1:8080 swift run applelm-chat "Why is the sky blue?"
import ApplelmClient
import Foundation

let env = ProcessInfo.processInfo.environment
let url = URL(string: env["APPLELM_SERVER_URL"] ?? "http://127.0.0.1:8080")!
let prompt = CommandLine.arguments.dropFirst().joined(separator: " ")
let client = ApplelmClient(baseURL: url, apiKey: env["APPLELM_API_KEY"])

do {
    let request = ChatRequest(messages: [.user(prompt.isEmpty ? "Say hello in one sentence." : prompt)],
                              maxCompletionTokens: 200, temperature: 0)
    for try await chunk in client.chatStream(request, includeUsage: true) {
        FileHandle.standardOutput.write(Data(chunk.text.utf8))  // unbuffered: tokens appear as they come
        if let usage = chunk.usage {
            print("\n[\(usage.promptTokens) prompt + \(usage.completionTokens) completion tokens]")
        }
    }
} catch {
    FileHandle.standardError.write(Data("applelm-chat: \(error)\n".utf8))
    exit(1)
}
