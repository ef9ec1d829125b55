// The typed errors of the web edge client, mirroring mobile_client.errors: every failure
// the page can meet is one of these, with a message naming the field, file or key.

/** Base class of every error raised on purpose by the web edge client. */
export class EdgeError extends Error {
  constructor(message) {
    super(message);
    this.name = this.constructor.name;
  }
}

/** A manifest.json or a bundle file that is missing, malformed or contradicts itself. */
export class ManifestError extends EdgeError {}

/** Images, targets or options given to the client that cannot be used. */
export class InputError extends EdgeError {}

/** An update that cannot be written (non-finite weights, bad metadata). */
export class UpdateError extends EdgeError {}
