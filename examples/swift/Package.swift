// swift-tools-version:6.0
// A Foundation-only client for `python -m applelm.server` (OpenAI-compatible API), plus a small example.
import PackageDescription

let package = Package(
    name: "ApplelmClient",
    platforms: [.macOS(.v12), .iOS(.v15)],
    products: [
        .library(name: "ApplelmClient", targets: ["ApplelmClient"]),
        .executable(name: "applelm-chat", targets: ["applelm-chat"]),
    ],
    targets: [
        .target(name: "ApplelmClient"),
        .executableTarget(name: "applelm-chat", dependencies: ["ApplelmClient"]),
        .testTarget(name: "ApplelmClientTests", dependencies: ["ApplelmClient"]),
    ]
)
