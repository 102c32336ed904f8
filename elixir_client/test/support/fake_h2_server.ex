defmodule Snakepit.FakeH2Server do
  @moduledoc false
  # A scripted HTTP/2 server on 127.0.0.1, built from the client's own frame and HPACK modules, for
  # failure cases a real grpcio server never produces (non-200 statuses, missing trailers, GOAWAY
  # mid-call, ...). For each completed request it calls `handler.(stream_id, headers, body)`, which
  # returns actions:
  #   {:headers, headers, end_stream?} | {:data, iodata, end_stream?} | {:rst, code}
  #   | {:goaway, last_stream_id, code} | :close | :hold (send nothing)
  #   | {:stream, stream_id, actions} (actions on another, earlier stream)
  #   | {:run, fun} (calls fun.() in the server: e.g. to wait for the test before going on)

  alias Snakepit.HPACK
  alias Snakepit.HTTP2.Frame

  @spec start((pos_integer(), list(), binary() -> list()), keyword()) :: pos_integer()
  def start(handler, settings \\ []) do
    {:ok, listen} = :gen_tcp.listen(0, [:binary, ip: {127, 0, 0, 1}, active: false])
    {:ok, port} = :inet.port(listen)
    pid = spawn(fn -> accept(listen, handler, settings) end)
    :ok = :gen_tcp.controlling_process(listen, pid)
    port
  end

  defp accept(listen, handler, settings) do
    {:ok, socket} = :gen_tcp.accept(listen, 5000)
    {:ok, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"} = :gen_tcp.recv(socket, 24, 5000)
    :ok = :gen_tcp.send(socket, Frame.encode({:settings, settings}))

    loop(%{
      socket: socket,
      handler: handler,
      buffer: "",
      dec: HPACK.new_decoder(),
      enc: HPACK.new_encoder(),
      requests: %{}
    })
  end

  defp loop(state) do
    case Frame.decode(state.buffer, 16_384) do
      {:ok, frame, _len, rest} ->
        handle(frame, %{state | buffer: rest})

      :more ->
        case :gen_tcp.recv(state.socket, 0, 10_000) do
          {:ok, data} -> loop(%{state | buffer: state.buffer <> data})
          {:error, _} -> :gen_tcp.close(state.socket)
        end
    end
  end

  defp handle({:settings, _}, state) do
    :gen_tcp.send(state.socket, Frame.encode(:settings_ack))
    loop(state)
  end

  defp handle({:headers, sid, block, %{end_headers: true} = flags}, state) do
    {:ok, headers, dec} = HPACK.decode(state.dec, block)
    state = %{state | dec: dec, requests: Map.put(state.requests, sid, {headers, ""})}
    if flags.end_stream, do: respond(sid, state), else: loop(state)
  end

  defp handle({:data, sid, data, flags}, state) do
    state = update_in(state.requests[sid], fn {headers, body} -> {headers, body <> data} end)
    if flags.end_stream, do: respond(sid, state), else: loop(state)
  end

  defp handle(_frame, state), do: loop(state)

  defp respond(sid, state) do
    {headers, body} = state.requests[sid]
    result = run(sid, state.handler.(sid, headers, body), state)
    if result == :closed, do: :ok, else: loop(result)
  end

  defp run(sid, actions, state) do
    Enum.reduce_while(actions, state, fn
      {:headers, headers, end_stream}, state ->
        {block, enc} = HPACK.encode(state.enc, headers)
        send_frame(state, {:headers, sid, block, %{end_headers: true, end_stream: end_stream}})
        {:cont, %{state | enc: enc}}

      {:data, data, end_stream}, state ->
        chunks = chunk(IO.iodata_to_binary(data))
        last = length(chunks) - 1

        for {piece, i} <- Enum.with_index(chunks),
            do: send_frame(state, {:data, sid, piece, %{end_stream: end_stream and i == last}})

        {:cont, state}

      {:rst, code}, state ->
        send_frame(state, {:rst_stream, sid, code})
        {:cont, state}

      {:goaway, last, code}, state ->
        send_frame(state, {:goaway, last, code, "test"})
        {:cont, state}

      {:stream, other, actions}, state ->
        case run(other, actions, state) do
          :closed -> {:halt, :closed}
          state -> {:cont, state}
        end

      {:run, fun}, state ->
        fun.()
        {:cont, state}

      :hold, state ->
        {:cont, state}

      :close, state ->
        :gen_tcp.close(state.socket)
        {:halt, :closed}
    end)
  end

  defp chunk(<<piece::binary-size(16_384), rest::binary>>) when rest != "",
    do: [piece | chunk(rest)]

  defp chunk(data), do: [data]

  defp send_frame(state, frame), do: :gen_tcp.send(state.socket, Frame.encode(frame))
end
