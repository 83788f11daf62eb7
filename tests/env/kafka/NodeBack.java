// Waits until a restarted node of the test bed's Kafka cluster is back in service: registered
// and unfenced (its metadata caught up with the controller's), and accepting SCRAM logins on
// its own SASL_SSL listener for the test bed's users.
//
// Kafka 4.4.0 (combined broker + controller nodes) has a defect this works around: once any
// SCRAM credential was changed at runtime (AlterUserScramCredentials), a node that restarts
// refuses every SCRAM credential that existed before its restart ("invalid credentials"), for
// as long as it runs; only credentials set after its restart work on it. Reproduced with
// `kafka-cluster.sh scram-set` + `scram-delete` of a throwaway user followed by
// `stop-node`/`start-node`. When the node is unfenced but refuses a test bed user, the
// users' credentials are set again at once (same passwords, so clients are unaffected), and
// every 5 s while it still refuses. Credentials that tests create for themselves are not
// set again.
//
// Run as a single-file program on the Kafka classpath:
//   java -cp 'libs/*' NodeBack.java PLAINTEXT_BOOTSTRAP NODE_ID SCRAM_HOST:PORT CA_FILE \
//        TIMEOUT_SECONDS USER=PASSWORD...
// Exit 0 when back, 1 (with what was last seen) at the timeout.
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.DescribeClusterOptions;
import org.apache.kafka.clients.admin.ScramCredentialInfo;
import org.apache.kafka.clients.admin.ScramMechanism;
import org.apache.kafka.clients.admin.UserScramCredentialAlteration;
import org.apache.kafka.clients.admin.UserScramCredentialUpsertion;
import org.apache.kafka.common.Node;

public class NodeBack {
    public static void main(String[] args) throws Exception {
        if (args.length < 6) {
            System.err.println("usage: NodeBack PLAINTEXT_BOOTSTRAP NODE_ID SCRAM_HOST:PORT CA_FILE TIMEOUT_SECONDS USER=PASSWORD...");
            System.exit(2);
        }
        String plain = args[0];
        int id = Integer.parseInt(args[1]);
        String scram = args[2];
        String ca = args[3];
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(Long.parseLong(args[4]));
        List<String[]> users = new ArrayList<>();
        for (int i = 5; i < args.length; i++) {
            users.add(args[i].split("=", 2));
        }
        Properties props = new Properties();
        props.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, plain);
        props.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, "5000");
        props.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, "10000");
        String last = "nothing checked yet";
        long refusedSince = 0;
        boolean reset = false;
        try (Admin admin = Admin.create(props)) {
            while (System.nanoTime() < deadline) {
                String state = unfenced(admin, id);
                if (state != null) {
                    last = state;
                    refusedSince = 0;
                } else {
                    String refused = null;
                    for (String[] u : users) {
                        String why = login(scram, ca, u[0], u[1]);
                        if (why != null) {
                            refused = u[0] + ": " + why;
                            break;
                        }
                    }
                    if (refused == null) {
                        System.out.println("node " + id + " is back: unfenced, SCRAM logins accepted"
                            + (reset ? " (after the test bed's SCRAM credentials were set again)" : ""));
                        return;
                    }
                    last = "node " + id + " is unfenced but refuses SCRAM logins (" + refused + ")";
                    // Set them again at the first refusal, not after a grace period: an
                    // unfenced node can be given leaderships (the controller's periodic
                    // preferred-leader election) or the group coordinator at any moment, and
                    // while it refuses the pods' credentials their heartbeats and fetches to it
                    // fail. Again every 5 s while it still refuses.
                    if (refusedSince == 0 || System.nanoTime() - refusedSince > TimeUnit.SECONDS.toNanos(5)) {
                        refusedSince = System.nanoTime();
                        System.out.println(last + "; setting the test bed's SCRAM credentials again");
                        List<UserScramCredentialAlteration> upserts = new ArrayList<>();
                        for (String[] u : users) {
                            upserts.add(new UserScramCredentialUpsertion(u[0],
                                new ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 4096), u[1]));
                        }
                        admin.alterUserScramCredentials(upserts).all().get();
                        reset = true;
                    }
                }
                Thread.sleep(500);
            }
        }
        System.out.println("node " + id + " is not back: " + last);
        System.exit(1);
    }

    /** Null when the node is registered and unfenced; otherwise what is wrong. */
    static String unfenced(Admin admin, int id) {
        try {
            for (Node n : admin.describeCluster(new DescribeClusterOptions().includeFencedBrokers(true))
                    .nodes().get()) {
                if (n.id() == id) {
                    return n.isFenced() ? "node " + id + " is registered but fenced" : null;
                }
            }
            return "node " + id + " is not registered";
        } catch (Exception e) {
            return "describing the cluster failed: " + e.getMessage();
        }
    }

    /** Null when USER can log in on the node's SCRAM listener; otherwise why not. */
    static String login(String scram, String ca, String user, String password) {
        Properties p = new Properties();
        p.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, scram);
        p.put(AdminClientConfig.SECURITY_PROTOCOL_CONFIG, "SASL_SSL");
        p.put("sasl.mechanism", "SCRAM-SHA-512");
        p.put("sasl.jaas.config", "org.apache.kafka.common.security.scram.ScramLoginModule required username=\""
            + user + "\" password=\"" + password + "\";");
        p.put("ssl.truststore.type", "PEM");
        p.put("ssl.truststore.location", ca);
        p.put("ssl.endpoint.identification.algorithm", "");
        p.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, "5000");
        p.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, "8000");
        try (Admin a = Admin.create(p)) {
            a.describeCluster().clusterId().get();
            return null;
        } catch (Exception e) {
            Throwable c = e.getCause() != null ? e.getCause() : e;
            return c.getClass().getSimpleName() + ": " + c.getMessage();
        }
    }
}
