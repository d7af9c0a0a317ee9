package sim

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
)

// The simulator's control socket and its simulated kernel speak the same small
// protocol: one JSON request line, one JSON answer line, one connection per request.

// jsonCall sends req to the Unix socket at path and decodes the answer line into resp.
// peer names the other side in errors.
func jsonCall(path, peer string, req, resp any) error {
	c, err := net.Dial("unix", path)
	if err != nil {
		return fmt.Errorf("cannot reach the %s: %w", peer, err)
	}
	defer c.Close()
	if err := writeJSONLine(c, req); err != nil {
		return fmt.Errorf("cannot send to the %s: %w", peer, err)
	}
	return readJSONLine(c, peer, resp)
}

func writeJSONLine(c net.Conn, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	_, err = c.Write(append(b, '\n'))
	return err
}

func readJSONLine(c net.Conn, peer string, v any) error {
	line, err := bufio.NewReader(c).ReadBytes('\n')
	if err != nil {
		return fmt.Errorf("%s closed the connection: %w", peer, err)
	}
	return json.Unmarshal(line, v)
}
