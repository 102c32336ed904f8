defmodule Snakepit.ForkServerProtocolTest do
  # The pool's side of the fork server's line protocol (no Python).
  use ExUnit.Case, async: true
  alias Snakepit.Pool.ForkServer

  defp ours(id), do: id in ["w1", "w2"]

  test "events of our children are parsed; their text keeps every byte after the kind" do
    assert {:event, "w1", {:spawned, 4242}} = ForkServer.parse_event("w1 spawned 4242", &ours/1)

    assert {:event, "w1", {:out, "SNAKEPIT_READY uds=/x pid=1 nonce=n"}} =
             ForkServer.parse_event("w1 out SNAKEPIT_READY uds=/x pid=1 nonce=n", &ours/1)

    assert {:event, "w2", {:err, "  two  spaces "}} =
             ForkServer.parse_event("w2 err   two  spaces ", &ours/1)

    assert {:event, "w2", {:out, ""}} = ForkServer.parse_event("w2 out ", &ours/1)
    assert {:event, "w2", {:exit, -9}} = ForkServer.parse_event("w2 exit -9", &ours/1)
    assert {:event, "w1", {:exit, 0}} = ForkServer.parse_event("w1 exit 0", &ours/1)
  end

  test "error events name our child or none" do
    assert {:error, "w1", "unknown flag --x"} =
             ForkServer.parse_event("error w1 unknown flag --x", &ours/1)

    assert {:error, nil, "bad request"} = ForkServer.parse_event("error - bad request", &ours/1)
  end

  test "log lines merged from stderr are not events, even when they look alike" do
    for line <- [
          "2026-01-01 10:00:00,000 - [MainThread] - INFO - fork server ready",
          "w9 out not one of ours",
          "w1 spawned notapid",
          "w1 exit soon",
          "w1 stdout text",
          "error: cannot import adapter module 'x'",
          "error w9 not ours",
          "w1",
          ""
        ] do
      assert ForkServer.parse_event(line, &ours/1) == :other, line
    end
  end

  test "the ready line counts only with the fork server's nonce" do
    assert {:ok, 77} = ForkServer.parse_ready("SNAKEPIT_FORKSERVER_READY pid=77 nonce=abc", "abc")
    assert :error = ForkServer.parse_ready("SNAKEPIT_FORKSERVER_READY pid=77 nonce=xyz", "abc")
    assert :error = ForkServer.parse_ready("SNAKEPIT_FORKSERVER_READY pid=77", "abc")
    assert :error = ForkServer.parse_ready("SNAKEPIT_READY pid=77 nonce=abc", "abc")
  end

  test "a spawn request is one line of JSON with the flags and the nonce, escaped" do
    line =
      ForkServer.spawn_request("w3", ["--uds", "/tmp/a \"b\"\\c\n.sock"], "n0")
      |> IO.iodata_to_binary()

    assert line ==
             ~S(spawn w3 {"args":["--uds","/tmp/a \"b\"\\c\u000A.sock"],"nonce":"n0"}) <> "\n"
  end
end
