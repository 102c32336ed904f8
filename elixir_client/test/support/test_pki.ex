defmodule Snakepit.Test.Pki do
  @moduledoc false
  # A throwaway CA and certificates made with openssl in `dir` (EC P-256 keys, quick to make):
  # server (localhost and 127.0.0.1-127.0.0.5, the loopback hosts of the tests), client and
  # wrong-name (wrong.example), signed by the CA; other-ca, a CA that signed none of them.
  # `make/1` returns a function from a name ("ca", "server-key", ...) to its PEM file.

  def make(dir) do
    File.mkdir_p!(dir)
    ca(dir, "ca", "snakepit test CA")
    ca(dir, "other-ca", "some other CA")

    signed(
      dir,
      "server",
      "localhost",
      "subjectAltName=DNS:localhost," <> Enum.map_join(1..5, ",", &"IP:127.0.0.#{&1}")
    )

    signed(dir, "client", "snakepit test client", "extendedKeyUsage=clientAuth")
    signed(dir, "wrong-name", "wrong.example", "subjectAltName=DNS:wrong.example")
    fn name -> Path.join(dir, "#{name}.pem") end
  end

  defp ca(dir, name, subject) do
    openssl!(dir, [
      "req",
      "-x509",
      "-newkey",
      "ec",
      "-pkeyopt",
      "ec_paramgen_curve:prime256v1",
      "-nodes",
      "-days",
      "2",
      "-subj",
      "/CN=#{subject}",
      "-addext",
      "basicConstraints=critical,CA:TRUE",
      "-addext",
      "keyUsage=critical,keyCertSign,cRLSign",
      "-keyout",
      "#{name}-key.pem",
      "-out",
      "#{name}.pem"
    ])
  end

  defp signed(dir, name, subject, extensions) do
    openssl!(dir, [
      "req",
      "-newkey",
      "ec",
      "-pkeyopt",
      "ec_paramgen_curve:prime256v1",
      "-nodes",
      "-subj",
      "/CN=#{subject}",
      "-keyout",
      "#{name}-key.pem",
      "-out",
      "#{name}.csr"
    ])

    File.write!(Path.join(dir, "#{name}.ext"), extensions <> "\n")

    openssl!(dir, [
      "x509",
      "-req",
      "-in",
      "#{name}.csr",
      "-CA",
      "ca.pem",
      "-CAkey",
      "ca-key.pem",
      "-CAcreateserial",
      "-days",
      "2",
      "-extfile",
      "#{name}.ext",
      "-out",
      "#{name}.pem"
    ])
  end

  defp openssl!(dir, args) do
    {out, status} = System.cmd("openssl", args, cd: dir, stderr_to_stdout: true)
    if status != 0, do: raise("openssl #{Enum.join(args, " ")} failed: #{out}")
  end
end
